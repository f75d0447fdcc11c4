"""Placement: ``libvirt-mdev place`` (and ``check`` with several ``--dest``) over five test-driver hosts."""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from libvirt_mdev.cli.place import place_all
from libvirt_mdev.mdev.dryrun import DestReport, read_source

from .conftest import HOSTS, REPO, host_uri

SRC = host_uri(HOSTS / "source.xml")
DESTS = [host_uri(HOSTS / f"{n}.xml") for n in ("dest-same", "dest-free", "dest", "dest-full", "dest-a100")]
GOLDEN = Path(__file__).parent / "golden"
U = "8f1e4a52-6c1e-4c1e-9a3b-5a0b7e3d00{:02d}"


def _args(*extra: str) -> list[str]:
    out = ["place", "demo", "--connect", SRC]
    for d in DESTS:
        out += ["--dest", d]
    return out + list(extra)


def _stable(text: str) -> str:
    """Golden files must not depend on the checkout path or the run's timing (what a rewrite stores)."""
    text = text.replace(str(REPO), "$REPO")
    text = re.sub(r'"seconds": [0-9.e-]+', '"seconds": 0', text)
    return re.sub(r"in [0-9.]+ s$", "in N s", text, flags=re.M)


def _normalise(text: str) -> str:
    """What is compared: table columns are as wide as the checkout path, so runs of spaces count as two."""
    return re.sub(r"(\S) {2,}", r"\1  ", _stable(text))


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("LIBVIRT_MDEV_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(_stable(text))
    assert _normalise(text) == _normalise(path.read_text()), f"{name} changed (LIBVIRT_MDEV_UPDATE_GOLDEN=1 rewrites it)"


def test_place_over_five_destinations_mixed_result(run_cli: Any) -> None:
    r = run_cli(*_args("--json"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["schema"] == "libvirt-mdev/place/1" and out["domain"] == "demo"
    rows = {Path(d["dest"]).name: d for d in out["destinations"]}
    assert [Path(d["dest"]).name for d in out["destinations"]] == [Path(u).name for u in DESTS]  # order kept
    assert {n: (d["label"], d["verdict"]) for n, d in rows.items()} == {
        "dest-same.xml": ("yes", "match"),
        "dest-free.xml": ("remap", "missing-on-dest"),
        "dest.xml": ("create", "type-mismatch"),
        "dest-full.xml": ("no", "missing-on-dest"),
        "dest-a100.xml": ("no", "missing-on-dest")}
    assert out["can_take"] == DESTS[:3]
    assert "available_instances 0" in rows["dest-full.xml"]["why"]
    assert "no parent here offers type nvidia-222" in rows["dest-a100.xml"]["why"]
    assert U.format(21) in rows["dest-free.xml"]["remap_plan"] and U.format(22) in rows["dest-free.xml"]["remap_plan"]
    _golden("place-demo.json", r.stdout)


def test_place_table(run_cli: Any) -> None:
    r = run_cli(*_args())
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("DEST"))
    assert lines[head].split() == ["DEST", "CAN", "TAKE", "VERDICT", "WHY"]
    assert [line.split()[1] for line in lines[head + 1:head + 6]] == ["yes", "remap", "create", "no", "no"]
    assert "result: 3 of 5 destinations can take demo (1 as-is, 2 with remapping)" in r.stdout
    _golden("place-demo.txt", r.stdout)


def test_check_with_several_dests_is_placement(run_cli: Any) -> None:
    args = ["check", "demo", "--connect", SRC] + [x for d in DESTS for x in ("--dest", d)] + ["--json"]
    r = run_cli(*args)
    assert r.returncode == 0 and json.loads(r.stdout)["schema"] == "libvirt-mdev/place/1"


def test_no_destination_can_take_it_exit_1_and_unreachable_is_a_row(run_cli: Any) -> None:
    bad = "qemu+tcp://127.0.0.1:1/system"
    r = run_cli("place", "demo", "--connect", SRC, "--dest", DESTS[3], "--dest", bad, "--dest", DESTS[4], "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert [d["verdict"] for d in out["destinations"]] == ["missing-on-dest", "unreachable", "missing-on-dest"]
    assert out["destinations"][1]["exit_code"] == 5 and out["destinations"][1]["error"]["kind"] == "connect"
    assert out["can_take"] == []


def test_destinations_are_asked_concurrently() -> None:
    """Five asks that each wait for all five: only a concurrent run gets past the barrier."""
    barrier = threading.Barrier(len(DESTS), timeout=20)
    threads: set[str] = set()

    def ask(source: Any, uri: str, **_: Any) -> DestReport:
        threads.add(threading.current_thread().name)
        barrier.wait()  # raises BrokenBarrierError when the asks run one after another
        return DestReport(uri, "match", 0, can_take=True, how="as-is")

    rows = place_all(read_source(SRC, "demo"), DESTS, ask)
    assert [r.dest for r, _ in rows] == DESTS and len(threads) == len(DESTS)


def test_place_source_errors_are_one_line(run_cli: Any) -> None:
    r = run_cli("place", "nope", "--connect", SRC, "--dest", DESTS[0])
    assert r.returncode == 12 and r.stderr.count("\n") == 1
    r = run_cli("place", "demo", "--connect", SRC, "--dest", DESTS[0], "--dest-sysfs", "/")
    assert r.returncode == 2 and "use it with check" in r.stderr
    r = run_cli("check", "demo", "--connect", SRC, "--dest", DESTS[0], "--dest", DESTS[1], "--dest-sysfs", "/")
    assert r.returncode == 2 and "exactly one --dest" in r.stderr


@pytest.mark.parametrize("domain,golden", [("demo-unannotated-mismatch", "check-unannotated-mismatch.txt"),
                                          ("demo-creatable", "check-creatable.txt")])
def test_check_golden_text(run_cli: Any, domain: str, golden: str) -> None:
    r = run_cli("check", domain, "--connect", SRC, "--dest", host_uri(HOSTS / "dest.xml"))
    assert r.returncode in (6, 7)
    _golden(golden, r.stdout)


def test_check_golden_json(run_cli: Any) -> None:
    r = run_cli("check", "demo-unannotated-missing", "--connect", SRC, "--dest", host_uri(HOSTS / "dest.xml"),
                "--json")
    assert r.returncode == 7
    _golden("check-unannotated-missing.json", r.stdout)
