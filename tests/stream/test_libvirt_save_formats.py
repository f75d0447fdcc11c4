"""`virsh save` in every --image-format of the libvirt on PATH (raw, gzip, bzip2, xz, lzop,
zstd, sparse, sparse with --parallel-channels 2): each image inspected, stripped and
spliced through libvirt_mdev.io.compress, the spliced image restored with `virsh restore`
and running; with synthetic VFIO devices injected, every device exactly accounted for
and the spliced stream identical.

The formats are probed on virsh itself (`virsh help save`), never by a version string:
libvirt 9.0 has no --image-format, and these tests skip there.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from libvirt_mdev.io.compress import open_image
from libvirt_mdev.store import Store
from libvirt_mdev.stream import StreamParser, iter_events
from libvirt_mdev.summary import Summarizer
from testkit.synth import SyntheticVfioDevice, inject

from .qemu_now import has_device, run_filter

pytestmark = pytest.mark.e2e

FORMATS = [("raw", 1), ("gzip", 1), ("bzip2", 1), ("xz", 1), ("lzop", 1), ("zstd", 1), ("sparse", 1), ("sparse", 2)]
DOMAIN = "lm-fmt"


def domain_xml(virtio_mem: bool) -> str:
    mem = ("<maxMemory slots='2' unit='MiB'>1024</maxMemory>"
           "<cpu><numa><cell id='0' cpus='0' memory='256' unit='MiB'/></numa></cpu>") if virtio_mem else ""
    dev = ("<memory model='virtio-mem'><target><size unit='MiB'>512</size><node>0</node>"
           "<block unit='MiB'>2</block><requested unit='MiB'>64</requested></target></memory>") if virtio_mem else ""
    return (f"<domain type='qemu'><name>{DOMAIN}</name><memory unit='MiB'>256</memory>{mem}<vcpu>1</vcpu>"
            f"<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>{dev}<serial type='null'/>"
            f"</devices></domain>")


@pytest.fixture(scope="module")
def fmt_host(libvirt_host, harness_dir: Path):
    helptext = libvirt_host.virsh("help", "save").stdout
    if "--image-format" not in helptext:
        pytest.skip("this libvirt's virsh save has no --image-format")
    xml = harness_dir / "fmt-domain.xml"
    xml.write_text(domain_xml(has_device("virtio-mem-pci")))
    libvirt_host.virsh("define", str(xml))
    libvirt_host.virsh("start", DOMAIN)
    time.sleep(1.0)
    yield libvirt_host, "--parallel-channels" in helptext
    libvirt_host.virsh("destroy", DOMAIN, check=False)
    libvirt_host.virsh("undefine", DOMAIN, check=False)


def _stream_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as raw, open_image(raw) as src:
        while b := src.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def _summary(path: Path):
    s = Summarizer()
    p = StreamParser()
    with open(path, "rb") as raw, open_image(raw) as src:
        for ev in iter_events(src, p):
            s.add(ev)
    return s.finish(p)


@pytest.mark.parametrize("fmt,channels", FORMATS, ids=[f"{f}-{c}" for f, c in FORMATS])
def test_save_format_round_trip(fmt, channels, fmt_host, harness_dir, tmp_path):
    host, has_channels = fmt_host
    if channels > 1 and not has_channels:
        pytest.skip("this libvirt's virsh save has no --parallel-channels")
    image = harness_dir / f"fmt-{fmt}-{channels}.save"
    args = ["save", DOMAIN, str(image), "--image-format", fmt]
    if channels > 1:
        args += ["--parallel-channels", str(channels)]
    host.virsh(*args, timeout=300)
    summ = _summary(image)
    assert summ.kind == "save-image" and summ.domain_name == DOMAIN and summ.save_image_complete
    assert ("mapped-ram" in summ.capabilities) == (fmt == "sparse")
    with Store.open(tmp_path / "store", create=True) as store:
        stripped, spliced = tmp_path / "stripped", tmp_path / "spliced"
        run_filter(image, stripped, store, "token")
        run_filter(stripped, spliced, store, "splice")
        assert spliced.read_bytes()[:92] == image.read_bytes()[:92]
        assert _stream_sha(spliced) == _stream_sha(image)
        if fmt == "sparse":  # written sparse again: holes stay holes
            assert spliced.stat().st_blocks * 512 < image.stat().st_blocks * 512 + (16 << 20)
        host.virsh("restore", str(spliced), timeout=300)
        assert host.domstate(DOMAIN) == "running"
        # injected VFIO devices (v2, switchover-ack framing): exactly accounted for, kept by strip/splice
        devs = [SyntheticVfioDevice(idstr="0000:00:05.0/vfio", framing="v2", precopy_size=200_000,
                                    stopcopy_size=2_000_003, seed=11, marker=b"MARK-LV", switchover_ack=True),
                SyntheticVfioDevice(idstr="0000:00:06.0/vfio", framing="v2", stopcopy_size=5, seed=12)]
        injected = tmp_path / "injected"
        with open(injected, "wb") as fh:
            inject(str(image), fh, devs)
        got = {(d.idstr, d.instance_id): d.state_bytes for d in _summary(injected).vfio}
        assert got == {(d.idstr, d.instance_id): d.state_bytes for d in devs}
        res = run_filter(injected, stripped, store, "token")
        assert sorted(r.length for r in res) == sorted(d.state_bytes for d in devs)
        run_filter(stripped, spliced, store, "splice")
        assert _stream_sha(spliced) == _stream_sha(injected)
    image.unlink()
