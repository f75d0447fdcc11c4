"""sysfs: type and parent of an active mdev, as the kernel lays it out (fake trees)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from libvirt_mdev.errors import MdevError, MdevMissing, UsageError
from libvirt_mdev.mdev.sysfs import SysfsEnv
from testkit.fakesysfs import FakeType, make_fake_sysfs

U1 = "4b20d080-1b54-4048-85b3-a6a62d165c01"
U2 = "4b20d080-1b54-4048-85b3-a6a62d165c02"
P = "0000:af:00.0"


@pytest.fixture
def env(tmp_path: Path) -> SysfsEnv:
    return make_fake_sysfs(tmp_path / "sys",
                           parents={P: {"nvidia-222": FakeType(name="GRID T4-1B", available_instances=15,
                                                               description="num_heads=4\nframe_rate_limiter=1"),
                                        "nvidia-223": {"name": "GRID T4-2B"}},
                                    "0000:3b:00.0": ["i915-GVTg_V5_8"]},
                           devices={U1: (P, "nvidia-222"), U2: ("0000:3b:00.0", "i915-GVTg_V5_8")})


def test_type_parent_and_device_api_of_an_active_mdev(env: SysfsEnv) -> None:
    m = env.mdev(U1)
    assert (m.uuid, m.type_id, m.parent, m.device_api, m.type_name) == (U1, "nvidia-222", P, "vfio-pci", "GRID T4-1B")
    assert env.mdev(U2.upper()).type_id == "i915-GVTg_V5_8"


def test_tree_has_kernel_layout(env: SysfsEnv) -> None:
    root = env.root
    link = root / "bus/mdev/devices" / U1
    assert link.is_symlink()
    assert os.readlink(link) == f"../../../devices/pci0000:00/{P}/{U1}"
    assert os.readlink(root / "devices/pci0000:00" / P / U1 / "mdev_type") == "../mdev_supported_types/nvidia-222"
    assert (root / "class/mdev_bus" / P).resolve() == (root / "devices/pci0000:00" / P).resolve()
    assert (root / "devices/pci0000:00" / P / "mdev_supported_types/nvidia-222/devices" / U1).resolve() == \
        (root / "devices/pci0000:00" / P / U1).resolve()


def test_type_is_the_canonical_basename_even_through_chained_links(env: SysfsEnv, tmp_path: Path) -> None:
    tdir = env.root / "devices/pci0000:00" / P / U1 / "mdev_type"
    tdir.unlink()
    hop = tmp_path / "hop"
    hop.symlink_to(env.root / "devices/pci0000:00" / P / "mdev_supported_types/nvidia-223")
    tdir.symlink_to(hop)
    assert env.mdev(U1).type_id == "nvidia-223"


def test_parents_and_supported_types(env: SysfsEnv) -> None:
    assert env.parents() == ["0000:3b:00.0", P]
    types = {t.type_id: t for t in env.supported_types(P)}
    assert set(types) == {"nvidia-222", "nvidia-223"}
    assert types["nvidia-222"].available_instances == 15
    assert types["nvidia-222"].description == "num_heads=4, frame_rate_limiter=1"
    assert types["nvidia-223"].description is None


def test_missing_mdev_raises_mdevmissing(env: SysfsEnv) -> None:
    with pytest.raises(MdevMissing, match="does not exist on this host") as exc:
        env.mdev("4b20d080-1b54-4048-85b3-a6a62d165cff")
    assert exc.value.exit_code == 7
    assert env.find("4b20d080-1b54-4048-85b3-a6a62d165cff") is None
    assert env.find(U1) is not None


def test_host_without_mdev_support_has_every_mdev_missing(tmp_path: Path) -> None:
    with pytest.raises(MdevMissing):
        SysfsEnv(tmp_path).mdev(U1)
    assert SysfsEnv(tmp_path).parents() == []


def test_bad_uuid_is_refused_before_touching_paths(env: SysfsEnv) -> None:
    with pytest.raises(UsageError):
        env.mdev("../../../etc")


def test_broken_mdev_type_link_is_a_clear_error(env: SysfsEnv) -> None:
    link = env.root / "devices/pci0000:00" / P / U1 / "mdev_type"
    link.unlink()
    link.symlink_to("../mdev_supported_types/gone")
    with pytest.raises(MdevError, match=f"cannot read the type of mdev {U1}") as exc:
        env.mdev(U1)
    assert not isinstance(exc.value, MdevMissing)
    assert "\n" not in str(exc.value)


def test_symlink_loop_is_a_clear_error(env: SysfsEnv) -> None:
    node = env.root / "bus/mdev/devices" / U1
    node.unlink()
    node.symlink_to(node.name)  # points at itself
    with pytest.raises(MdevError, match="cannot read the type"):
        env.mdev(U1)


def test_mdev_type_not_a_directory_is_a_clear_error(env: SysfsEnv) -> None:
    link = env.root / "devices/pci0000:00" / P / U1 / "mdev_type"
    link.unlink()
    link.write_text("nvidia-222\n")
    with pytest.raises(MdevError, match="cannot read the type"):
        env.mdev(U1)


def test_fake_device_with_undeclared_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="has no type"):
        make_fake_sysfs(tmp_path, parents={P: ["a"]}, devices={U1: (P, "b")})


def test_fake_tree_can_be_extended_in_place(env: SysfsEnv) -> None:
    U3 = "4b20d080-1b54-4048-85b3-a6a62d165c03"
    make_fake_sysfs(env.root, parents={P: ["nvidia-223"]}, devices={U3: (P, "nvidia-223")})
    assert env.mdev(U3).type_id == "nvidia-223"
    assert env.mdev(U1).type_id == "nvidia-222"


def test_example_spec_builds_the_dest_host(tmp_path: Path) -> None:
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(repo / "examples/sysfs/build.py"),
                        str(repo / "examples/sysfs/dest-host.json"), str(tmp_path / "sys")],
                       capture_output=True, text=True, check=True)
    assert "8f1e4a52-6c1e-4c1e-9a3b-5a0b7e3d0002  nvidia-224" in r.stdout
    assert SysfsEnv(tmp_path / "sys").mdev("8f1e4a52-6c1e-4c1e-9a3b-5a0b7e3d0001").parent == "0000:3b:00.0"
