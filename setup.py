"""Packaging for sna: the daemon package plus its twistd plugin."""

from setuptools import find_packages, setup

setup(
    name="sna",
    version="1.4.0",
    description="Sendense Node Appliance control daemon",
    python_requires=">=3.11",
    # twisted/plugins has no __init__.py (Twisted's own must not be shadowed),
    # so find_packages() cannot see it: it is listed by hand.
    packages=[*find_packages(exclude=["tests", "tests.*", "benchmarks"]), "twisted.plugins"],
    package_data={
        "sna": ["py.typed"],
        # The dashboard's page, styles and script (sna/web), served at / and /ui/.
        "sna.web": ["static/*"],
    },
    install_requires=[
        "twisted>=24.7",
        "klein>=24.8",
        "treq>=24.9",
        "attrs>=23.1",
        "prometheus-client>=0.20",
        "pyvmomi>=8.0",
        # Reading vCenter certificates for sna-ctl vcenter trust (sna/vmware/pins.py).
        "cryptography>=42",
        # The hub's enrollment URL over HTTPS, pinned or checked against a CA file
        # (sna/enrollment/hub.py): Twisted's TLS and its host-name check.
        "pyopenssl>=24.0",
        "service-identity>=24.1",
    ],
    entry_points={
        "console_scripts": [
            "sendense-backup-client = sna.backup.cli:main",
            "sna-ctl = sna.ctl.cli:main",
        ],
    },
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6",
            "mypy>=1.10",
            "mypy-zope>=1.0",
            "ruff>=0.6",
            # The OpenAPI document's tests (tests/unit/test_openapi.py,
            # tests/integration/test_openapi.py).
            "openapi-spec-validator>=0.7",
            "jsonschema>=4.18",
            "schemathesis>=4.0",
            # The dashboard's browser tests (tests/integration/test_dashboard.py) drive
            # Debian's chromium (make deps); Playwright never downloads a browser here.
            "playwright>=1.45",
        ],
    },
)
