"""Descriptors: the small parser the /folder reader rests on."""

from __future__ import annotations

import pytest

from sna.backup.readers import ReaderError, parse_descriptor

DESCRIPTOR = """# Disk DescriptorFile
version=1
createType="vmfs"

# Extent description
RW 34817 VMFS "vm1-flat.vmdk"

ddb.adapterType = "lsilogic"
"""


def test_flat_descriptor() -> None:
    assert parse_descriptor(DESCRIPTOR, "vm1/vm1.vmdk") == ("vm1/vm1-flat.vmdk", 34817 * 512, 0)
    hosted = DESCRIPTOR.replace('VMFS "vm1-flat.vmdk"', 'FLAT "x-flat.vmdk" 8')
    assert parse_descriptor(hosted, "a/b/x.vmdk") == ("a/b/x-flat.vmdk", 34817 * 512, 4096)


@pytest.mark.parametrize(
    "extents",
    [
        'RW 34817 VMFSSPARSE "vm1-000001-delta.vmdk"',
        'RW 34817 SESPARSE "vm1-000001-sesparse.vmdk"',
        'RW 100 VMFS "a-flat.vmdk"\nRW 100 VMFS "b-flat.vmdk"',
        "",
    ],
)
def test_not_a_single_flat_extent(extents: str) -> None:
    text = DESCRIPTOR.replace('RW 34817 VMFS "vm1-flat.vmdk"', extents)
    with pytest.raises(ReaderError, match="--reader nbd"):
        parse_descriptor(text, "vm1/vm1.vmdk")
