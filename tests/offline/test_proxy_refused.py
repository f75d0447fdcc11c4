"""Refused means gone, proxy path: a stream with complete devices followed by garbage is refused by
the proxy, and none of the states it stored can be loaded; a good stream's tokens can.

The live session needs no call of its own for this (its ``finally: flt.close()`` refuses an
unaccepted stream with the error in flight); ``StreamFilter.abort`` covers failures after the
stream's end (test_refused_gc.py).
"""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from libvirt_mdev.errors import TokenError
from libvirt_mdev.store import Store, resolve_token
from testkit.synth import SyntheticVfioDevice, inject, write_minimal_stream
from tests.proxy.conftest import ID_A, ID_B, U1, ProxyEnv, Sink, proxy_env, replay, wait_results

__all__ = ["proxy_env"]  # the fixture, used by name


def stream(tmp_path: Path) -> bytes:
    plain = tmp_path / "plain"
    with open(plain, "wb") as fh:
        write_minimal_stream(fh)
    out = io.BytesIO()
    inject(str(plain), out, [SyntheticVfioDevice(idstr=ID_A, stopcopy_size=200_000, seed=1),
                             SyntheticVfioDevice(idstr=ID_B, stopcopy_size=1000, framing="v2", seed=2)])
    return out.getvalue()


@pytest.mark.parametrize("mode", ["splice", "token"])
def test_garbage_after_complete_devices_is_refused_and_nothing_loads(proxy_env: ProxyEnv, tmp_path: Path,
                                                                      mode: str) -> None:
    proxy_env.arm()
    sink = Sink()
    px = proxy_env.proxy(sink.endpoint, mode=mode)
    data = stream(tmp_path)
    replay(px.address.port, data + b"\x42" * 4096)
    wait_results(px)
    res = px.results[0]
    assert not res.ok
    with Store.open(proxy_env.config.store) as st:
        entries = st.list()
        assert len(entries) == 2 and all(e.status == "refused" for e in entries), entries
        for e in entries:
            assert e.stream is not None and e.stream.reason
            assert e.manifest is not None
            if e.manifest.mdev_uuid == U1:
                with pytest.raises(TokenError, match="refused stream"):
                    resolve_token(st, f"mdev-state-v1:{e.id}", U1)


def test_a_good_stream_is_accepted_at_its_end(proxy_env: ProxyEnv, tmp_path: Path) -> None:
    proxy_env.arm()
    sink = Sink()
    px = proxy_env.proxy(sink.endpoint, mode="token")
    replay(px.address.port, stream(tmp_path))
    wait_results(px)
    assert px.results[0].ok, px.results[0].error
    with Store.open(proxy_env.config.store) as st:
        [a] = [e for e in st.list() if e.manifest is not None and e.manifest.mdev_uuid == U1]
        assert a.status == "ready"
        assert resolve_token(st, f"mdev-state-v1:{a.id}", U1).mdev_uuid == U1
