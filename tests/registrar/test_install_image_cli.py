"""`registrar install-image` as an operator runs it, against the stand-in cloud."""

from __future__ import annotations

import os
import pty
import re
import subprocess
from pathlib import Path

from tests.registrar.bundle_check import check_bundle
from tests.support.cloud import StandInCloud
from tests.support.images import ImageFactory


def install_image(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["registrar", "install-image", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,  # type: ignore[call-overload]
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("registrar: error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


def test_installs_a_kernel_then_a_machine_image_naming_it(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    config = cloud.write_config(tmp_path / "registrar.toml")
    kernel = image_factory.blob(2 * 1024 * 1024, seed=11, kind="kernel")
    machine = image_factory.ext4(size_mib=8, seed=12)

    done = install_image("--config", config, "--type", "kernel", kernel)
    assert done.returncode == 0, done.stderr
    kernel_id = done.stdout.strip()
    assert re.fullmatch(r"ami-[0-9a-f]+", kernel_id)

    done = install_image(
        "--config", config, "--kernel", kernel_id, "--name", "my-image/v1", machine
    )
    assert done.returncode == 0, done.stderr
    machine_id = done.stdout.strip()
    kernel_call, machine_call = cloud.calls_of("RegisterImage")
    assert machine_call["KernelId"] == kernel_id and machine_call["Name"] == "my-image/v1"
    assert kernel_call["Name"].startswith(kernel.name + "-")  # unique, from the file name
    assert sorted(cloud.image_ids()) == sorted([kernel_id, machine_id])
    checked = check_bundle(cloud, machine_call["ImageLocation"], signed=True)
    assert checked.image_sha1 == image_factory.sha1(machine)
    assert checked.kernel_id == kernel_id and checked.name == "my-image/v1"
    assert check_bundle(cloud, kernel_call["ImageLocation"], signed=True).image_type == "kernel"


def test_compressed_file_is_unpacked_unless_raw(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    config = cloud.write_config(tmp_path / "registrar.toml")
    raw = image_factory.ext4(size_mib=8, seed=12)
    packed = image_factory.compressed("xz", size_mib=8, seed=12)
    env = {**os.environ, "IMAGEPROXY_CONFIG": str(config)}  # the config from the environment
    assert install_image(packed, env=env).returncode == 0
    assert install_image("--raw", packed, env=env).returncode == 0
    unpacked, as_is = cloud.calls_of("RegisterImage")
    assert check_bundle(cloud, unpacked["ImageLocation"], signed=True).image_sha1 == (
        image_factory.sha1(raw)
    )
    assert check_bundle(cloud, as_is["ImageLocation"], signed=True).image_sha1 == (
        image_factory.sha1(packed)
    )


def test_a_ramdisk_is_bundled_byte_for_byte(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    config = cloud.write_config(tmp_path / "registrar.toml")
    ramdisk = image_factory.blob(1024 * 1024, seed=13, kind="ramdisk")  # starts like a gzip
    done = install_image("--config", config, "--type", "ramdisk", ramdisk)
    assert done.returncode == 0, done.stderr
    [call] = cloud.calls_of("RegisterImage")
    checked = check_bundle(cloud, call["ImageLocation"], signed=True)
    assert (checked.image_type, checked.image_sha1) == ("ramdisk", image_factory.sha1(ramdisk))


def test_a_refused_registration_is_one_line_exit_1_and_leaves_nothing(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    config = cloud.write_config(tmp_path / "registrar.toml")
    cloud.refuse("RegisterImage", "InvalidManifest", "the manifest signature is invalid")
    result = install_image("--config", config, image_factory.ext4(size_mib=8, seed=12))
    assert result.returncode == 1
    assert one_line_error(result) == (
        "registrar: error: RegisterImage: InvalidManifest: the manifest signature is invalid"
    )
    assert result.stdout == ""
    assert cloud.bucket_keys() == [] and cloud.image_ids() == []

    # --debug, as every registrar command takes it: the traceback, then the same last line.
    result = install_image("--config", config, "--debug", image_factory.ext4(size_mib=8, seed=12))
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "registrar: error: RegisterImage: InvalidManifest: the manifest signature is invalid"
    )
    assert cloud.bucket_keys() == [] and cloud.image_ids() == []


def test_usage_config_and_file_errors_exit_2(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    image = image_factory.ext4(size_mib=8, seed=12)
    good = cloud.write_config(tmp_path / "good.toml")
    bad = cloud.write_config(tmp_path / "bad.toml", colour="blue")
    env = {k: v for k, v in os.environ.items() if k != "IMAGEPROXY_CONFIG"}
    cases = [
        (("--config", tmp_path / "missing.toml", image), "does not exist"),
        (("--config", bad, image), "[cloud] colour: unknown key"),
        (("--config", good, tmp_path / "no-such.img"), "no-such.img"),
        ((image,), "no config file"),
        (("--config", good, "--type", "kernel", "--ramdisk", "eri-1", image), "--ramdisk"),
        (("--config", good, "--name", "no spaces allowed", image), "image name"),
    ]
    for args, message in cases:
        result = install_image(*args, env=env)
        assert result.returncode == 2, (args, result.stderr)
        assert message in one_line_error(result)
    assert cloud.bucket_keys() == [] and cloud.image_ids() == []


def test_progress_bar_on_a_terminal(
    cloud: StandInCloud, tmp_path: Path, image_factory: ImageFactory
) -> None:
    config = cloud.write_config(tmp_path / "registrar.toml")
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [
                "registrar",
                "install-image",
                "--config",
                str(config),
                str(image_factory.ext4(size_mib=8, seed=12)),
            ],
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
        )
        os.close(slave)
        screen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not chunk:
                break
            screen += chunk
        out, _ = proc.communicate(timeout=120)
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert re.fullmatch(r"ami-[0-9a-f]+\n", out)
    assert b"bundling" in screen and b"MB" in screen
