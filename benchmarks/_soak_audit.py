"""After the soak: do the answers, the registry, the bucket and the cloud agree?

`audit(site, outcomes)` returns a dict of findings (lists of problems, empty when all is well)
and how many registered images' bundles it unbundled:

- `wrong_ids`: an answered call whose ids differ from the registry's answer for its metadata,
  or from another answered call for the same image;
- `bad_bundles`: a registered image whose bundle does not unbundle (tests/registrar/bundle_check,
  the way the cloud would) to its source's SHA-1, or whose machine manifest names another kernel
  or ramdisk than the answer;
- `orphan_folders` / `orphan_manifests`: bucket folders or manifests no registered image uses;
- `orphan_images`: images in the cloud the registry does not know;
- `missing`: registry images the cloud or the bucket no longer has;
- `jobs_left`: registrations still in flight in the registry after every call ended;
- `violations`: RegisterImage calls Eucalyptus would refuse (the recording proxy's checks).
"""

from __future__ import annotations

import collections
from typing import Any

from _soak_site import Site

from registrar.registry import Registry
from tests.registrar.bundle_check import BundleInvalid, check_bundle


def _locations(site: Site) -> dict[str, str]:
    """Image name -> ImageLocation of its RegisterImage, as the recording proxy saw it."""
    return {
        call.get("Name", ""): call.get("ImageLocation", "")
        for call in site.cloud.calls_of("RegisterImage")
    }


def audit(site: Site, outcomes: list[dict[str, Any]]) -> tuple[dict[str, list[str]], int]:
    """Compare the answers with the registry, the bucket and the cloud; see the docstring."""
    cloud = site.cloud
    registry = Registry(site.stack.state_dir)
    try:
        answers = {a.metadata_sha1: a for a in registry.answers()}
        images = registry.images()
        jobs = registry.jobs()
    finally:
        registry.close()
    found: dict[str, list[str]] = collections.defaultdict(list)

    by_sha1 = {image.metadata_sha1: image for image in site.images}
    seen: dict[int, dict[str, str]] = {}
    for outcome in outcomes:
        if outcome["kind"] != "ok":
            continue
        image = site.images[outcome["image"]]
        ids = outcome["ids"]
        answer = answers.get(image.metadata_sha1)
        expected = (
            {"FILESYSTEM": answer.filesystem, "KERNEL": answer.kernel, "RAMDISK": answer.ramdisk}
            if answer
            else None
        )
        if ids != expected:
            found["wrong_ids"].append(f"call {outcome['seq']}: {ids} but registry {expected}")
        if seen.setdefault(image.index, ids) != ids:
            found["wrong_ids"].append(f"call {outcome['seq']}: {ids} != {seen[image.index]}")

    described = cloud.ec2.describe_images(Owners=["self"])["Images"]
    in_cloud = {i["ImageId"]: i["Name"] for i in described}
    locations = _locations(site)
    used_locations = {locations.get(name, "") for name in in_cloud.values()}
    bucket = cloud.bucket
    keys = set(cloud.bucket_keys())

    registered_ids = {image.image_id for image in images}
    for image_id in sorted(set(in_cloud) - registered_ids):
        found["orphan_images"].append(f"{image_id} ({in_cloud[image_id]})")
    for image in images:
        if image.image_id not in in_cloud:
            found["missing"].append(f"{image.key}: {image.image_id} not in the cloud")
        manifest = image.manifest or f"{image.prefix}/{image.prefix}.manifest.xml"
        if manifest not in keys:
            found["missing"].append(f"{image.key}: {manifest} not in the bucket")
    used_folders = {loc.partition("/")[2].rpartition("/")[0] for loc in used_locations}
    for folder in sorted({key.split("/", 1)[0] for key in keys} - used_folders):
        found["orphan_folders"].append(folder)
    for key in sorted(k for k in keys if k.endswith(".manifest.xml")):
        if f"{bucket}/{key}" not in used_locations:
            found["orphan_manifests"].append(key)
    found["jobs_left"] = [f"{job.key} ({job.owner})" for job in jobs]
    found["violations"] = cloud.take_violations()

    ids_of = {image.image_id: image for image in images}
    checked = 0
    for sha1, answer in answers.items():
        image = by_sha1.get(sha1)
        if image is None:
            found["wrong_ids"].append(f"answer for unknown metadata {sha1}")
            continue
        for image_id, want, kind in (
            (answer.filesystem, image.fs_sha1, "machine"),
            (answer.kernel, image.kernel_sha1, "kernel"),
            (answer.ramdisk, image.ramdisk_sha1, "ramdisk"),
        ):
            problem = _check_one(site, image_id, want, kind, answer, in_cloud, locations)
            checked += 1
            if problem:
                found["bad_bundles"].append(f"image {image.index} {kind} {image_id}: {problem}")
        if ids_of.get(answer.filesystem) is None:
            found["missing"].append(f"answer {sha1}: {answer.filesystem} not in the registry")
    return {key: list(value) for key, value in found.items()}, checked


def _check_one(
    site: Site,
    image_id: str,
    want_sha1: str,
    kind: str,
    answer: Any,
    in_cloud: dict[str, str],
    locations: dict[str, str],
) -> str:
    """Unbundle one registered image the way the cloud would; "" if it is the right one."""
    if image_id not in in_cloud:
        return "not in the cloud"
    location = locations.get(in_cloud[image_id])
    if not location:
        return "no RegisterImage recorded for its name"
    try:
        checked = check_bundle(site.cloud, location, signed=True)
    except (BundleInvalid, site.cloud.s3.exceptions.NoSuchKey) as exc:
        return f"bundle at {location}: {exc}"
    if checked.image_type != kind:
        return f"bundle type {checked.image_type}"
    if checked.image_sha1 != want_sha1:
        return f"unbundles to {checked.image_sha1}, not the source's {want_sha1}"
    if kind == "machine" and (checked.kernel_id, checked.ramdisk_id) != (
        answer.kernel,
        answer.ramdisk,
    ):
        return f"names kernel {checked.kernel_id} and ramdisk {checked.ramdisk_id}"
    return ""
