"""Issue 13 items 7 and 9: every number finite and in range; config files and folders must be the user's own."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pocketd.daemon.config import ConfigError, check_locations, load_config
from pocketd.daemon.settings import PathsConfig, PocketdConfig
from pocketd.store import Store, UnsafeLocation, tighten_dir

NOBODY = 65534
as_root = pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user needs root")


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


# -- item 9: non-finite and absurd numbers -----------------------------------------------------


@pytest.mark.parametrize(("section", "key", "value"), [
    ("policy", "max_battery_temp_c", "nan"),  # would train at any temperature
    ("policy", "max_battery_temp_c", "80"),
    ("policy", "max_load", "inf"),
    ("policy", "memory_budget_mb", str(10**12)),
    ("policy", "max_session_minutes", "inf"),
    ("daemon", "request_timeout_s", "inf"),  # made the socket unusable and `status` crash
    ("daemon", "stop_grace_s", "nan"),
    ("trainer", "eps", "inf"),
    ("trainer", "lr", "nan"),
    ("trainer", "side_save_every_s", "inf"),
    ("ingest", "max_document_bytes", str(10**15)),
])
def test_non_finite_and_absurd_numbers_are_refused_naming_the_field(section: str, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={f"POCKETD_{section.upper()}__{key.upper()}": value})
    text = str(info.value)
    assert f"{section}.{key} (from env POCKETD_{section.upper()}__{key.upper()})" in text
    assert "finite" in text or "less than" in text or "greater than" in text


def test_nan_and_inf_literals_in_the_toml_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[policy]\nmax_battery_temp_c = nan\n[trainer]\neps = inf\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, environ={})
    assert f"policy.max_battery_temp_c (in {f}): Input should be a finite number" in str(info.value)
    assert f"trainer.eps (in {f}): Input should be a finite number" in str(info.value)


def test_a_huge_bad_value_is_echoed_once_and_cut(tmp_path: Path) -> None:
    huge = "x" * 5_000_000
    for key in ("quiet_hours", "max_load"):
        f = tmp_path / f"{key}.toml"
        f.write_text(f'[policy]\n{key} = "{huge}"\n')
        with pytest.raises(ConfigError) as info:
            load_config(f, environ={})
        text = str(info.value)
        assert len(text) < 500, text[:600]
        assert text.count("'xxx") == 1 and "(5000002 characters)" in text
        assert f"policy.{key} (in {f})" in text


def test_defaults_are_within_the_bounds() -> None:
    PocketdConfig()  # every default passes its own bounds
    assert load_config(environ={"POCKETD_POLICY__MAX_BATTERY_TEMP_C": "45.5"}).config.policy.max_battery_temp_c == 45.5


# -- item 7: the config file -------------------------------------------------------------------


def test_a_config_file_others_may_write_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[policy]\nmax_load = 3\n")
    for bits, who in ((0o664, "group"), (0o646, "others"), (0o666, "group and others")):
        f.chmod(bits)
        with pytest.raises(ConfigError, match=f"config file is writable by {who} .*chmod go-w {f}"):
            load_config(f, environ={})
    f.chmod(0o644)  # readable by others is the user's business; writable is not
    assert load_config(f, environ={}).config.policy.max_load == 3


def test_a_config_file_in_a_folder_others_may_write_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    f = d / "c.toml"
    f.write_text("[policy]\nmax_load = 3\n")
    d.chmod(0o777)
    with pytest.raises(ConfigError, match="folder .* is writable by others .* chmod go-w"):
        load_config(f, environ={})
    d.chmod(0o1777)  # sticky, like /tmp: others cannot replace our file
    assert load_config(f, environ={}).config.policy.max_load == 3


@as_root
def test_a_config_file_of_another_user_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[paths]\ndata_dir = "/somewhere/theirs"\n')
    os.chown(f, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"{f}: the config file belongs to another user \\(uid {NOBODY}"):
        load_config(f, environ={})


def test_a_config_path_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file is not a regular file"):
        load_config(tmp_path, environ={})


# -- item 7: data, state and cache folders ------------------------------------------------------


def _paths(tmp_path: Path) -> PathsConfig:
    return PathsConfig(data_dir=tmp_path / "data", state_dir=tmp_path / "state", cache_dir=tmp_path / "cache",
                       runtime_dir=tmp_path / "rt")


@as_root
def test_a_data_dir_of_another_user_is_refused_and_left_alone(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    paths.data_dir.mkdir(mode=0o755)
    os.chown(paths.data_dir, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"paths.data_dir: {paths.data_dir}: the folder belongs to another user"):
        check_locations(paths)
    with pytest.raises(UnsafeLocation, match="belongs to another user"):
        Store.open(paths.database)
    assert mode(paths.data_dir) == 0o755 and os.stat(paths.data_dir).st_uid == NOBODY  # not chmod'ed
    assert not paths.database.exists()


@pytest.mark.parametrize("name", ["data_dir", "state_dir", "cache_dir"])
def test_folders_others_may_write_are_refused(tmp_path: Path, name: str) -> None:
    paths = _paths(tmp_path)
    folder: Path = getattr(paths, name)
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(ConfigError, match=f"paths.{name}: {folder}: the folder is writable by group and others"):
        check_locations(paths)
    assert mode(folder) == 0o777
    folder.chmod(0o755)
    check_locations(paths)  # only readable by others: pocketd tightens its own folders itself


def test_missing_folders_are_fine(tmp_path: Path) -> None:
    check_locations(_paths(tmp_path))


def test_tighten_dir_never_chmods_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    target.chmod(0o755)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UnsafeLocation, match=f"chmod 700 {target}"):
        tighten_dir(link)
    assert mode(target) == 0o755
    target.chmod(0o700)
    assert tighten_dir(link) == link


def test_a_symlinked_runtime_dir_target_is_not_chmodded(tmp_path: Path) -> None:
    from pocketd.daemon.server import ControlServer, SocketError

    target = tmp_path / "target"
    target.mkdir()
    target.chmod(0o755)
    link = tmp_path / "rt-link"
    link.symlink_to(target)
    server = ControlServer(link / "pocketd.sock", dispatcher=None)  # type: ignore[arg-type]
    with pytest.raises(SocketError, match="accessible to others"):
        server.bind()
    assert mode(target) == 0o755
    target.chmod(0o700)
    server.bind()  # a private target is used as it is
    try:
        assert (target / "pocketd.sock").exists()
    finally:
        server.close()
