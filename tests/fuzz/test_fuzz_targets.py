"""The other fuzz targets under hypothesis: filter (strip/splice), save-image header,
token resolver, domain-XML parser.  Each runs the same one-input function as its
atheris harness (targets.py), so a CI failure and a long-run crash reproduce alike.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvirt_mdev.errors import StreamError, UnsupportedStream
from libvirt_mdev.stream.saveimage import decode_header, encode_header
from libvirt_mdev.stream.wire import SAVE_HEADER, SAVE_MAGIC_COMPLETE, SAVE_MAGIC_PARTIAL

from .make_corpus import DOMAIN_XML, save_image
from .strategies import mutations, valid_streams
from .targets import FilterTarget, TokenTarget, run_domain_xml, run_save_image_header

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture]}


@pytest.fixture(scope="module")
def filter_target():
    t = FilterTarget()
    yield t
    t.close()


@pytest.fixture(scope="module")
def token_target():
    t = TokenTarget()
    yield t
    t.close()


@settings(max_examples=80, **SETTINGS)
@given(built=valid_streams())
def test_filter_strip_then_splice_is_the_identity_on_valid_streams(filter_target, built):
    filter_target.run(built.data)


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_filter_on_mutated_streams_raises_only_project_errors(filter_target, data):
    built = data.draw(valid_streams(max_parts=2))
    filter_target.run(data.draw(mutations(built.data)))


@settings(max_examples=60, **SETTINGS)
@given(built=valid_streams(max_parts=1), xml=st.sampled_from([DOMAIN_XML, b"<domain><name>x</name></domain>", b""]))
def test_filter_on_save_images(filter_target, built, xml):
    """A save image's own domain XML binds (or refuses) the VFIO sections: MdevError or identity."""
    filter_target.run(save_image(built.data, xml))


@settings(max_examples=300, **SETTINGS)
@given(magic=st.sampled_from([SAVE_MAGIC_COMPLETE, SAVE_MAGIC_PARTIAL, b"LibvirtQemudXXXX"]),
       fields=st.lists(st.sampled_from([0, 1, 2, 3, 6, 7, 92, 0xFFFF, 0x02000000, 0xFFFFFFFF, 1 << 26, (1 << 26) + 1]),
                       min_size=5, max_size=5),
       tail=st.binary(max_size=200))
def test_save_image_header_fields(magic, fields, tail):
    head = SAVE_HEADER.pack(magic, *fields, b"\0" * 56)
    run_save_image_header(head + tail)
    try:
        decode_header(head)
    except StreamError as exc:
        assert exc.offset is not None
        return
    assert magic != b"LibvirtQemudXXXX"


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_mutated_save_images(data):
    built = data.draw(valid_streams(max_parts=1, max_devices=1))
    run_save_image_header(data.draw(mutations(save_image(built.data)[:400] + built.data[:200])))


def test_save_image_limits_are_stream_errors():
    """The XML area limit and a cookie offset beyond it are refusals with an offset."""
    from libvirt_mdev.stream.wire import MAX_SAVE_DATA_LEN

    from .targets import parse_checked
    big = encode_header(SAVE_MAGIC_COMPLETE, MAX_SAVE_DATA_LEN + 1, 1, 0, 0)
    _evs, err = parse_checked(big + b"<domain/>", 0)
    assert isinstance(err, StreamError) and "XML area" in str(err)
    bad_cookie = encode_header(SAVE_MAGIC_COMPLETE, 100, 1, 0, 101)
    _evs, err = parse_checked(bad_cookie + b"\0" * 100, 0)
    assert isinstance(err, StreamError) and "cookie" in str(err)
    gz = encode_header(SAVE_MAGIC_COMPLETE, 100, 1, 1, 0)
    _evs, err = parse_checked(gz + b"\0" * 100, 0)
    assert isinstance(err, UnsupportedStream) and "gzip-compressed" in str(err) and "gzip -dc" in str(err)


@settings(max_examples=300, **SETTINGS)
@given(text=st.one_of(st.binary(max_size=120), st.text(max_size=90).map(lambda s: s.encode("utf-8", "surrogatepass")),
                      st.integers(0, 63).flatmap(lambda i: st.binary(min_size=1, max_size=3).map(
                          lambda b, i=i: ("mdev-state-v1:" + "0" * 64).encode()[:14 + i] + b)),
                      st.sampled_from([b"mdev-state-v1:" + b"a" * 64 + b"\n", b"mdev-state-v1:" + b"A" * 64,
                                       b"mdev-state-v1:../" + b"0" * 61, b"\x00" * 78])))
def test_token_resolver_refuses_everything_but_the_real_token(token_target, text):
    token_target.run(text)


def test_token_target_accepts_the_real_token(token_target):
    """The target is not vacuous: the one real token resolves (for its own mdev only)."""
    token_target.run(token_target.token.encode())  # 'm' is odd: resolved for its own mdev
    from libvirt_mdev.store.tokens import resolve_token
    assert resolve_token(token_target.store, token_target.token, token_target.MDEV).id == token_target.manifest.id


def _xml_mutations():
    base = DOMAIN_XML.decode()
    return st.tuples(st.integers(0, len(base)), st.integers(0, 40), st.text(max_size=20)).map(
        lambda t: (base[:t[0]] + t[2] + base[t[0] + t[1]:]).encode("utf-8", "surrogatepass"))


@settings(max_examples=300, **SETTINGS)
@given(xml=st.one_of(_xml_mutations(), st.binary(max_size=300),
                     st.sampled_from([b"<!DOCTYPE d [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><domain>&e;</domain>",
                                      b"<?xml version='1.0'?><!DOCTYPE l [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'>"
                                      b"<!ENTITY c '&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;'><!ENTITY d '&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;'>]>"
                                      b"<domain><name>&d;&d;&d;&d;&d;&d;</name></domain>",
                                      b"<domain>" * 5000, b"\xff\xfe<\x00d\x00"])))
def test_domain_xml_parser_raises_only_project_errors(xml):
    run_domain_xml(xml)
