"""Hub roles on disk: what a role needs, the lock file, downloads, and every Hub failure as one line.

Used by :class:`pipeline.models.registry.ModelRegistry` (the one owner of locating and loading roles); the
CLI's ``models pull`` goes through the registry. Nothing here loads a model.

- **Plan** (:func:`plan_role`): the resolved commit and the files a role's loader reads, with sizes
  (and the SHA-256 the Hub states for LFS files), from the lock file when it has the role, else from
  the Hub (``model_info`` with file metadata), else, offline, from the local HF cache.
- **Fetch** (:func:`fetch_plan`): download the missing files of a plan into the HF cache at that
  commit (a cut transfer is resumed with an HTTP Range request, within one run by huggingface_hub,
  across runs from the partial blob a failed run leaves, see :func:`_prefetch_blob`), check the
  SHA-256 of each file downloaded, and return the lock entry.
- **Lock** (``paths.models_lock``, JSON): per role the repo, the revision asked for, the resolved
  commit and every file with size and SHA-256. Later pulls and loads use it: same commit, same files.
- **Errors** (:func:`hub_error`): an unreachable Hub, a gated or missing repo, revision or file, a
  full disk, offline without a cached copy: a :class:`~pipeline.models.registry.ModelLoadError` naming the
  role, the source and what to do. huggingface_hub 1.x/2.x raise ``httpx``/``httpx2`` transport
  errors (not ``OSError``) when the Hub cannot be reached; they are mapped here too.

The endpoint (``HF_ENDPOINT``) and cache (``HF_HUB_CACHE`` / ``HF_HOME``) are read when used, not
when huggingface_hub was imported.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# pipeline.models.registry imports this module only inside functions: no import cycle.
from pipeline.errors import ModelLoadError
from pipeline.io.hashing import file_sha256
from pipeline.io.imageio import atomic_write_text
from pipeline.settings import error_fields

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.settings import ModelSource

# Files whose bytes are known independently of the lock (from their publishers' release notes).
# (repo, file) -> (sha256, size)
KNOWN_SHA256: dict[tuple[str, str], tuple[str, int]] = {
    ("ybelkada/segment-anything", "checkpoints/sam_vit_b_01ec64.pth"):
        ("ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375_042_383),
    # LaMa's big-lama.pt as IOPaint publishes it (github.com/Sanster/models release add_big_lama);
    # the Hub mirror must serve the same bytes. Also pinned as models.inpaint_fill.sha256.
    ("fashn-ai/LaMa", "big-lama.pt"):
        ("344c77bbcb158f17dd143070d1e789f38a66c04202311ae3a258ef66667a9ea9", 205_669_692),
}

COMMIT_RE = re.compile(r"[0-9a-f]{40}")


# ------------------------------------------------------------------------------------------------
# The lock file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LockedFile(_Strict):
    path: str = Field(description="path inside the repo, '/'-separated")
    size: int = Field(ge=0, description="bytes")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class LockEntry(_Strict):
    repo: str
    revision: str | None = Field(None, description="what the settings asked for (None = the default branch)")
    filename: str | None = Field(None, description="the single file of a `filename` source")
    commit: str = Field(pattern=r"^[0-9a-f]{40}$", description="the commit `revision` resolved to")
    files: list[LockedFile]

    def matches(self, src: "ModelSource") -> bool:
        """The entry was written for this source: same repo and file, and the settings still ask
        for the revision it resolved (or for its commit)."""
        return (src.repo == self.repo and src.filename == self.filename
                and src.revision in (self.revision, self.commit))

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class ModelsLock(_Strict):
    version: int = 1
    roles: dict[str, LockEntry] = Field(default_factory=dict)


class LockFileError(Exception):
    """The lock file exists but cannot be read as one (file and reason in ``str()``)."""


def read_lock(path: Path) -> ModelsLock:
    """The lock at ``path``; an empty one when the file does not exist. Raises LockFileError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ModelsLock()
    except OSError as e:
        raise LockFileError(f"{path}: cannot be read: {e}") from None
    try:
        return ModelsLock.model_validate_json(text)
    except ValidationError as e:
        where, reason = error_fields(e)[0]
        raise LockFileError(f"{path}: not a models lock file ({where}: {reason}); "
                            "delete it and run `product-studio models pull` to write it again") from None


def write_lock_entry(path: Path, role: str, entry: LockEntry) -> None:
    """Set ``role``'s entry in the lock at ``path`` (read, update, atomic replace)."""
    lock = read_lock(path)
    lock.roles[role] = entry
    lock.roles = dict(sorted(lock.roles.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, lock.model_dump_json(indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Where things are


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def repo_dir(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def snapshot_dir(cache: Path, repo: str, commit: str) -> Path:
    return repo_dir(cache, repo) / "snapshots" / commit


def cached_commit(cache: Path, repo: str, revision: str | None) -> str | None:
    """The commit ``revision`` (default ``main``) resolved to when it was last fetched into the
    cache, or None. A commit hash resolves to itself when its snapshot folder exists."""
    rev = revision or "main"
    if COMMIT_RE.fullmatch(rev):
        return rev if snapshot_dir(cache, repo, rev).is_dir() else None
    ref = repo_dir(cache, repo) / "refs" / rev
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit if COMMIT_RE.fullmatch(commit) else None


# ------------------------------------------------------------------------------------------------
# Plans


@dataclass
class PlanFile:
    path: str
    size: int
    sha256: str | None  # expected: from the lock, or the Hub's LFS metadata; None = not stated
    cached: bool


@dataclass
class RolePlan:
    """What a Hub role needs: ``files`` of ``repo`` at ``commit`` (``origin``: lock | hub | cache)."""

    role: str
    source: str
    repo: str
    revision: str | None
    filename: str | None
    commit: str
    files: list[PlanFile]
    origin: str
    cache: Path = field(repr=False, default=Path("."))

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def missing(self) -> list[PlanFile]:
        return [f for f in self.files if not f.cached]

    @property
    def to_download(self) -> int:
        return sum(f.size for f in self.missing)

    def location(self) -> Path:
        """The snapshot folder, or the file itself for a ``filename`` source."""
        snap = snapshot_dir(self.cache, self.repo, self.commit)
        return snap / self.filename if self.filename else snap


def plan_role(role: str, src: "ModelSource", select: Callable[[list[str]], list[str]], *,
              entry: LockEntry | None, offline: bool) -> RolePlan:
    """The files ``role`` needs and whether each is in the cache (see the module docstring).

    ``select``: the role's loader's file list from a repo listing (pipeline.models.registry.role_files).
    Never downloads; online without a lock entry it asks the Hub for the listing (one request).
    Raises ModelLoadError for every failure."""
    cache = hub_cache_dir()
    base = dict(role=role, source=src.describe(), repo=src.repo, revision=src.revision, filename=src.filename,
                cache=cache)
    if entry is not None:
        snap = snapshot_dir(cache, src.repo, entry.commit)
        files = [PlanFile(f.path, f.size, f.sha256, (snap / f.path).is_file()) for f in entry.files]
        return RolePlan(commit=entry.commit, files=files, origin="lock", **base)
    if offline:
        commit = cached_commit(cache, src.repo, src.revision)
        snap = snapshot_dir(cache, src.repo, commit) if commit else None
        if snap is not None and snap.is_dir():
            present = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())
            names = [src.filename] if src.filename else select(present)
            if names and all((snap / n).is_file() for n in names):
                files = [PlanFile(n, (snap / n).stat().st_size, None, True) for n in names]
                return RolePlan(commit=commit, files=files, origin="cache", **base)
        raise offline_error(role, src)
    try:
        info = hub_api().model_info(src.repo, revision=src.revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes one ModelLoadError
        raise hub_error(role, src, e) from None
    if not info.sha or not COMMIT_RE.fullmatch(info.sha):
        raise ModelLoadError(role, src.describe(), f"the Hub at {hub_endpoint()} did not say which commit "
                             f"{src.revision or 'main'} is", "check HF_ENDPOINT points at a Hugging Face Hub")
    listing = {s.rfilename: s for s in info.siblings or []}
    if src.filename:
        if src.filename not in listing:
            raise ModelLoadError(role, src.describe(), f"file {src.filename} not found in {src.repo} at "
                                 f"{info.sha[:12]} (404)", f"check models.{role}.filename in the settings")
        names = [src.filename]
    else:
        names = select(sorted(listing))
        if not names:
            raise ModelLoadError(role, src.describe(), f"{src.repo} holds none of the files this role loads",
                                 f"check models.{role}.repo in the settings")
    snap = snapshot_dir(cache, src.repo, info.sha)
    files = []
    for n in names:
        s = listing[n]
        size = s.size if s.size is not None else (s.lfs.size if s.lfs else 0)
        files.append(PlanFile(n, int(size), s.lfs.sha256 if s.lfs else None, (snap / n).is_file()))
    return RolePlan(commit=info.sha, files=files, origin="hub", **base)


# ------------------------------------------------------------------------------------------------
# Fetching


class _ByteCounter:
    """Stands in for huggingface_hub's tqdm bar: forwards the bytes of the file written to
    ``on_bytes`` and draws nothing. ``update_transfer`` (network bytes, Xet downloads) makes
    huggingface_hub use one bar per file (see utils/_xet_progress_reporting.py); those bytes are
    not counted twice. Any other bar method it calls (postfix, refresh) does nothing."""

    on_bytes: Callable[[int], None] = staticmethod(lambda n: None)

    def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any):
        self.total, self.n = total, initial

    def update(self, n: int | float = 1) -> None:
        self.n += int(n)
        type(self).on_bytes(int(n))

    def update_transfer(self, n: int | float = 1) -> None:
        pass

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: None

    def __enter__(self) -> "_ByteCounter":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def fetch_plan(plan: RolePlan, src: "ModelSource", *, on_bytes: Callable[[int], None] | None = None,
               hash_cached: bool = True) -> LockEntry:
    """Download ``plan``'s missing files (checking each one's SHA-256 where the lock or the Hub
    states it) and return the role's lock entry. ``hash_cached``: also hash files that were already
    in the cache (needed when the plan did not come from the lock). Raises ModelLoadError."""
    from huggingface_hub import hf_hub_download

    role = plan.role
    snap = snapshot_dir(plan.cache, plan.repo, plan.commit)
    if plan.missing:
        if plan.origin == "lock":
            # A cheap request first: an unreachable Hub, a gated repo or a commit that is gone fails
            # here at once (hf_hub_download would retry with back-off for ~20 s before failing).
            try:
                hub_api().model_info(plan.repo, revision=plan.commit)
            except Exception as e:  # noqa: BLE001
                raise hub_error(role, src, e, revision=f"{plan.commit} (from the models lock)") from None
        _check_space(plan)
        counter = type("RoleBytes", (_ByteCounter,), {"on_bytes": staticmethod(on_bytes or (lambda n: None))})
    hashes: dict[str, str] = {}
    for f in plan.files:
        local = snap / f.path
        if not f.cached:
            try:
                _prefetch_blob(plan, f.path, counter)
                local = Path(hf_hub_download(plan.repo, f.path, revision=plan.commit, cache_dir=str(plan.cache),
                                             endpoint=hub_endpoint(), tqdm_class=counter))
            except Exception as e:  # noqa: BLE001
                raise hub_error(role, src, e, file=f.path, revision=plan.commit) from None
        elif not hash_cached and f.sha256:
            hashes[f.path] = f.sha256
            continue
        digest = file_sha256(local)
        if f.sha256 and digest != f.sha256:
            if not f.cached:
                _drop_cached_file(local)
            raise ModelLoadError(role, src.describe(), f"{f.path}: SHA-256 {digest[:12]}... is not the expected "
                                 f"{f.sha256[:12]}... ({'downloaded' if not f.cached else 'cached'} at "
                                 f"{plan.commit[:12]})",
                                 "run `product-studio models pull` again; if it persists the repo changed under "
                                 "the same commit or the cache is damaged: delete the file from the HF cache")
        hashes[f.path] = digest
    files = [LockedFile(path=f.path, size=(snap / f.path).stat().st_size, sha256=hashes[f.path]) for f in plan.files]
    rev = plan.revision or "main"
    if not COMMIT_RE.fullmatch(rev):
        # As huggingface_hub does: the branch or tag -> commit it resolved to, for offline use.
        ref = repo_dir(plan.cache, plan.repo) / "refs" / rev
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(plan.commit)
    return LockEntry(repo=plan.repo, revision=plan.revision, filename=plan.filename, commit=plan.commit, files=files)


def _prefetch_blob(plan: RolePlan, path: str, counter: Any) -> None:
    """Download ``path``'s blob into the HF cache (``blobs/<etag>``), resuming from a partial file a
    failed earlier run left (``blobs/<etag>.partial``). huggingface_hub 2.x resumes a cut transfer
    within one run but deletes its own partial file when the run fails; with the blob in place,
    ``hf_hub_download`` only links it into the snapshot. Xet-stored files are left to
    huggingface_hub (Xet keeps its own chunk cache)."""
    from urllib.parse import urlparse

    from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url, http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    endpoint = hub_endpoint()
    url = hf_hub_url(plan.repo, path, revision=plan.commit, endpoint=endpoint)
    meta = get_hf_file_metadata(url, endpoint=endpoint)
    if meta.xet_file_data is not None or not meta.etag:
        return
    blobs = repo_dir(plan.cache, plan.repo) / "blobs"
    blob = blobs / meta.etag
    if blob.exists():
        return
    blobs.mkdir(parents=True, exist_ok=True)
    part = blobs / f"{meta.etag}.partial"
    headers = build_hf_headers()
    if urlparse(meta.location).netloc != urlparse(url).netloc:
        headers.pop("authorization", None)  # a signed CDN URL: no Hub token to a third party
    with WeakFileLock(str(part) + ".lock"):
        with open(part, "ab") as fh:
            done = fh.tell()
            if meta.size is not None and done > meta.size:
                fh.truncate(0)
                done = 0
            if done:
                counter.on_bytes(done)  # the part fetched by an earlier run
            http_get(meta.location, fh, resume_size=done, headers=headers, expected_size=meta.size,
                     tqdm_class=counter)
        os.replace(part, blob)


def _check_space(plan: RolePlan) -> None:
    where = plan.cache
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    # hf_hub_download writes a blob beside its .incomplete twin only by rename: the size once.
    if plan.to_download > free:
        raise ModelLoadError(plan.role, plan.source, f"disk full: {human_bytes(plan.to_download)} to download, "
                             f"{human_bytes(free)} free at {where}",
                             "free space there, or set HF_HUB_CACHE to a folder on a larger disk")


def _drop_cached_file(path: Path) -> None:
    """Remove a bad download (snapshot link and its blob) so the next pull fetches it again."""
    blob = path.resolve()
    for p in {path, blob}:
        try:
            p.unlink()
        except OSError:
            pass


def hub_api() -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint())


# ------------------------------------------------------------------------------------------------
# Errors


def offline_error(role: str, src: "ModelSource") -> ModelLoadError:
    return ModelLoadError(role, src.describe(), "not in the local Hugging Face cache and offline mode is on",
                          "run `product-studio models pull` where the Hub is reachable, or set "
                          f"models.{role}.path to a local copy")


def _transport_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """The HTTP client's errors: (could not talk to the server at all, lost it in the middle of a
    response). httpx2 (huggingface_hub 2.x), httpx (1.x), requests (0.x); none of httpx's is an
    OSError."""
    def find(names: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
        out = []
        for mod, name in names:
            try:
                out.append(getattr(__import__(mod, fromlist=[name]), name))
            except (ImportError, AttributeError):
                pass
        return tuple(out)

    lost = find((("httpx2", "RemoteProtocolError"), ("httpx2", "ReadError"), ("httpx2", "ReadTimeout"),
                 ("httpx", "RemoteProtocolError"), ("httpx", "ReadError"), ("httpx", "ReadTimeout"),
                 ("requests.exceptions", "ChunkedEncodingError")))
    transport = find((("httpx2", "TransportError"), ("httpx", "TransportError"),
                      ("requests.exceptions", "ConnectionError"), ("requests.exceptions", "Timeout")))
    return transport, lost


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def hub_error(role: str, src: "ModelSource", exc: BaseException, *, file: str | None = None,
              revision: str | None = None) -> ModelLoadError:
    """One ModelLoadError for a failed Hub call: what happened, and what to do about it."""
    from huggingface_hub import errors as he

    source = src.describe()
    endpoint = hub_endpoint()
    what = f"{file} of {src.repo}" if file else src.repo
    status = getattr(getattr(exc, "response", None), "status_code", None)
    chain = _chain(exc)
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain):
        return ModelLoadError(role, source, f"disk full while downloading {what} into {hub_cache_dir()}",
                              "free space there, or set HF_HUB_CACHE to a folder on a larger disk")
    if isinstance(exc, he.GatedRepoError):
        return ModelLoadError(role, source, f"{src.repo} is a gated repository: access needs a logged-in account "
                              f"that accepted its licence (HTTP {status})",
                              f"run `hf auth login` (or set HF_TOKEN), then accept the licence at "
                              f"{endpoint}/{src.repo}")
    if isinstance(exc, he.RepositoryNotFoundError):
        if status == 401:
            return ModelLoadError(role, source, f"{src.repo}: not found, or private/gated and this machine is not "
                                  "logged in (HTTP 401)",
                                  f"check models.{role}.repo; for a private or gated repo run `hf auth login` "
                                  "and accept its licence on the Hub")
        return ModelLoadError(role, source, f"repository {src.repo} not found on the Hub (HTTP {status or 404})",
                              f"check models.{role}.repo in the settings")
    if isinstance(exc, he.RevisionNotFoundError):
        return ModelLoadError(role, source, f"revision {revision or src.revision or 'main'} not found in {src.repo} "
                              f"(HTTP {status or 404})",
                              f"check models.{role}.revision in the settings, or remove the role's entry from "
                              "the models lock file if it names a commit that is gone")
    if isinstance(exc, he.RemoteEntryNotFoundError) or (isinstance(exc, he.HfHubHTTPError) and status == 404):
        return ModelLoadError(role, source, f"{what} not found on the Hub (HTTP 404)",
                              f"check models.{role}.repo / filename in the settings")
    if isinstance(exc, (he.OfflineModeIsEnabled, he.LocalEntryNotFoundError)):
        return offline_error(role, src)
    transport, lost = _transport_errors()
    for e in chain:
        if lost and isinstance(e, lost):
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            return ModelLoadError(role, source, f"the connection to the Hub at {endpoint} was lost while "
                                  f"downloading {what} ({detail})",
                                  "run `product-studio models pull` again: it resumes where this run stopped")
        if transport and isinstance(e, transport):
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            return ModelLoadError(role, source, f"the Hub at {endpoint} cannot be reached ({detail})",
                                  "check the network, proxy and HF_ENDPOINT; or set HF_HUB_OFFLINE=1 to use only "
                                  "the local cache")
    if isinstance(exc, he.HfHubHTTPError):
        first = str(exc).splitlines()[0]
        return ModelLoadError(role, source, f"the Hub answered HTTP {status}: {first}",
                              "try again later; check HF_ENDPOINT and your token (`hf auth login`)")
    first = (str(exc).splitlines() or [""])[0]
    return ModelLoadError(role, source, f"download of {what} failed: {type(exc).__name__}: {first}",
                          "check the network and the disk, then run `product-studio models pull` again")


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"  # pragma: no cover
