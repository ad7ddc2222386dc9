"""A dataset's annotation files before LAVIS reads them: local files checked (exist, valid
JSON, well-formed entries; ``datasets.checks``), and a failed download explained with the
config keys that point LAVIS at local copies."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from lavis.common.registry import registry
from lavis.common.utils import get_cache_path, is_url
from omegaconf import open_dict

from lavis_cprd.datasets.checks import check_annotation_file
from lavis_cprd.errors import NETWORK_ERRORS, first_line


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def check_annotation_files(name: str, dcfg) -> None:
    """Before LAVIS reads them: every local annotation file exists, is valid JSON and holds a
    list of well-formed entries (``datasets.checks.check_annotation_file``). With
    ``datasets.NAME.skip_bad: true`` malformed entries are left out (a filtered copy under the
    cache root takes the file's place) instead of stopping."""
    annotations = dcfg.get("build_info", {}).get("annotations", {})
    skip_bad = bool(dcfg.get("skip_bad", False))
    work_dir = os.path.join(registry.get_path("cache_root"), "lavis_cprd_filtered", name)
    for split, info in annotations.items():
        where = f"datasets.{name}.build_info.annotations.{split}"
        urls, storages = _as_list(info.get("url")), _as_list(info.get("storage"))
        for i, storage in enumerate(storages):
            path = storage if os.path.isabs(storage) else get_cache_path(storage)
            url = urls[i] if i < len(urls) else None
            if os.path.isfile(path):
                source = path
            elif url and is_url(url):
                continue  # LAVIS downloads it
            elif url and os.path.isfile(url):
                source = url  # LAVIS copies it to the storage path
            else:
                raise FileNotFoundError(
                    f"{where}: annotation file {path!r} does not exist"
                    + (f" (and url {url!r} is neither a URL nor a file)" if url else "")
                )
            filtered = check_annotation_file(source, split, where, skip_bad, work_dir)
            if filtered is not None:  # LAVIS reads the filtered copy (it copies url only to a missing storage)
                storages[i] = filtered
                with open_dict(info):
                    info.storage = list(storages)


@contextlib.contextmanager
def download_hints(datasets_cfg) -> Iterator[None]:
    """A dataset download that fails (offline, say) names what LAVIS tried to fetch and the
    config keys that point it at local copies instead."""
    try:
        yield
    except NETWORK_ERRORS as e:
        wanted = []
        for name, dcfg in datasets_cfg.items():
            for split, info in dcfg.get("build_info", {}).get("annotations", {}).items():
                for url in _as_list(info.get("url")):
                    if is_url(str(url)):
                        wanted.append(f"{url} (datasets.{name}.build_info.annotations.{split}.url)")
        raise ConnectionError(
            f"a dataset download failed: {first_line(e)}. LAVIS downloads "
            f"these annotation files when they are not at their storage path: {wanted or 'none found'}. Offline, "
            "download them elsewhere and set datasets.NAME.build_info.annotations.SPLIT.url and .storage to the "
            "local file (the same absolute path), and datasets.NAME.build_info.images.storage to the image folder"
        ) from e
