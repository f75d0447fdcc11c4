"""Bounds of signed-stream format 2: each proxy holds one VFIO block at a time (its peak
RSS does not grow with the device's state), and the source refuses to hold a block over
MAX_SIGNED_BLOCK (it would have to buffer it whole to sign it ahead of its bytes)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from libvirt_mdev.errors import SignatureError, StreamError
from libvirt_mdev.sign.layers import MAX_SIGNED_BLOCK
from libvirt_mdev.stream.wire import BE64, VfioFlag
from testkit.synth import SyntheticVfioDevice, inject
from tests.stream.builders import small_stream

from .conftest import BINDINGS, DOMAIN, IDSTR_A, sign

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent('''
    import io, json, os, sys
    from pathlib import Path
    from libvirt_mdev.filter import Binding, FilterOptions
    from libvirt_mdev.sign.keys import TrustedKeys, generate_key
    from libvirt_mdev.sign.layers import SignContext, VerifyPolicy, sign_stream, verify_stream
    from libvirt_mdev.store import Store

    def hwm():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    src, signed, store_dir, domain, idstr, mdev, mtype = sys.argv[1:]
    key = generate_key("bounds")
    bindings = {idstr: Binding(mdev, mtype)}
    base = hwm()
    with open(src, "rb") as fi, open(signed, "wb") as fo:
        sign_stream(fi, fo.write, SignContext(key=key, source_host="src", domain_uuid=domain,
                                             bindings=bindings))
    after_sign = hwm()
    opts = FilterOptions(mode="splice", domain_name="g", domain_uuid=domain, bindings=bindings,
                         migration_id="bounds-1")
    with Store.open(Path(store_dir), create=True, uid=os.geteuid()) as store, open(signed, "rb") as fi:
        results, _layer = verify_stream(fi, lambda b: None, store, opts,
                                        VerifyPolicy(TrustedKeys([key.public]), require=True))
    print(json.dumps({"base": base, "sign": after_sign, "verify": hwm(), "length": results[0].length}))
''')


@pytest.mark.slow
def test_peak_rss_is_one_block_not_the_device_state(tmp_path: Path) -> None:
    state = 192 << 20
    base = tmp_path / "base.stream"
    base.write_bytes(small_stream())
    src = tmp_path / "vfio.stream"
    with open(src, "wb") as fh:
        inject(str(base), fh, [SyntheticVfioDevice(idstr=IDSTR_A, stopcopy_size=state, framing="v2", seed=5)])
    b = BINDINGS[IDSTR_A]
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "signed.stream"),
                          str(tmp_path / "store"), DOMAIN, IDSTR_A, b.mdev_uuid, b.mdev_type],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    print("peak RSS MiB", r)
    assert r["length"] == state
    # the interpreter and its imports, plus a few MiB for one 1 MiB block and the read chunks:
    # far below the 192 MiB the device sends
    assert r["sign"] - r["base"] < 40, r
    assert r["verify"] - r["base"] < 40, r


def test_source_refuses_to_hold_a_block_over_the_limit(plain_stream: bytes, key_a) -> None:
    marker = BE64.pack(VfioFlag.DEV_DATA_STATE)
    at = plain_stream.index(marker)
    huge = plain_stream[:at] + marker + BE64.pack(MAX_SIGNED_BLOCK + 1) + b"\0" * 100
    with pytest.raises(SignatureError) as exc:
        sign(huge, key_a)
    msg = exc.value.message
    assert "refusing to sign" in msg and str(MAX_SIGNED_BLOCK) in msg and "\n" not in msg


def test_source_signs_a_block_at_the_limit_header(plain_stream: bytes, key_a) -> None:
    """The limit is the block's announced size: a block at the limit is held (here the
    stream ends inside it, which the parser reports, not the sign layer)."""
    marker = BE64.pack(VfioFlag.DEV_DATA_STATE)
    at = plain_stream.index(marker)
    cut = plain_stream[:at] + marker + BE64.pack(MAX_SIGNED_BLOCK) + b"\0" * 100
    with pytest.raises(StreamError) as exc:
        sign(cut, key_a)
    assert not isinstance(exc.value, SignatureError)

