# Run with `twistd -ny sna.tac`; the same service as `twistd sna` with its defaults,
# state and logs under ./var (for development).
from twisted.application.service import Application

from sna.tap import Options, makeService

options = Options()
options.parseOptions(["--state-dir", "var/state", "--log-dir", "var/log"])
application = Application("sna")
makeService(options).setServiceParent(application)
