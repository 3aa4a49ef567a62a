"""Catalog runs: many inputs (files, folders, a CSV of SKUs) through the one runner
(:meth:`pipeline.run.process.Processor.process`), with a JSONL manifest and a static HTML contact
sheet (``report.html``) for review. The job loop lives here; the CLI only shows progress."""

from __future__ import annotations

import csv
import html
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from pipeline.ops.actions import Action, parse_action_text
from pipeline.run.deaths import death_message, exhausted
from pipeline.errors import BadInput, ModelUnavailable, ParamsError, internal_error_message
from pipeline.io.imageio import ImageLoadError, atomic_write_text, is_image_name, load_image, save_image
from pipeline.io.outputs import OutputFolder, write_failure
from pipeline.ops.compliance import summary
from pipeline.ops.profiles import get_profile
from pipeline.run.rules import RuleSet, load_rules, rules_from_dict
from pipeline.settings import SettingsError

log = logging.getLogger("product_studio.run")


@dataclass
class CatalogItem:
    """One input. ``classes``/``actions``: per-row overrides from a catalog CSV (None = rules);
    ``mask``: a product mask file or folder (``run/edit --mask``), with ``product_class`` its class
    (or, with ``actions``, the class they apply to); ``tag``: appended to the output stem
    (``edit OP`` uses the op's name)."""

    path: Path
    classes: list[str] | None = None
    actions: list[Action] | None = None
    sku: str | None = None
    mask: Path | None = None
    product_class: str | None = None
    tag: str = ""
    profiles: list[str] | None = None


class CatalogError(BadInput):
    """A catalog CSV that cannot be used; ``str()`` names the file, the row and the column."""


def read_catalog_csv(path: Path, settings: Any) -> list[CatalogItem]:
    """A CSV with a ``path`` (or ``image``) column, optional ``class`` (names separated by ``|``),
    ``action`` (``"displace x=-10% y=0; enhance seed=3"``, see
    :func:`pipeline.ops.actions.split_action_text`; validated against ``settings``) and ``sku``.
    Relative paths (images, LoRA files) resolve against the CSV's folder. Raises
    :class:`CatalogError` naming the row and column for a bad row."""
    items = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in reader.fieldnames or []}
        key = cols.get("path") or cols.get("image")
        if key is None:
            raise CatalogError(f"{path}: catalog CSV needs a 'path' (or 'image') column; found {', '.join(cols) or 'none'}")
        for n, row in enumerate(reader, start=2):
            raw = (row.get(key) or "").strip()
            if not raw:
                raise CatalogError(f"{path}:{n}: column {key!r}: empty path")
            p = Path(raw).expanduser()
            p = p if p.is_absolute() else path.parent / p
            cls = (row.get(cols.get("class", "")) or "").strip() if "class" in cols else ""
            act = (row.get(cols.get("action", "")) or "").strip() if "action" in cols else ""
            try:
                actions = parse_action_text(act, settings, bases=(path.parent, None)) if act else None
            except ParamsError as e:
                raise CatalogError(f"{path}:{n}: column {cols['action']!r}: {e}") from None
            sku = (row.get(cols["sku"]) or "").strip() if "sku" in cols else None
            items.append(CatalogItem(p, [c.strip() for c in cls.split("|") if c.strip()] or None, actions, sku or None))
    return items


def collect_items(paths: Iterable[Path], settings: Any, recursive: bool = False) -> list[CatalogItem]:
    """Files as given, folders expanded to their images (recursive on request; hidden files and
    ``._*`` skipped), ``.csv`` files read as catalogs."""
    items: list[CatalogItem] = []
    for p in paths:
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            files = sorted(f for f in it if f.is_file() and is_image_name(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            items.extend(CatalogItem(f) for f in files)
        elif p.suffix.lower() == ".csv":
            items.extend(read_catalog_csv(p, settings))
        else:
            items.append(CatalogItem(p))
    return items


@dataclass
class CatalogJob:
    """One input to process, with its output stem (chosen up front, in input order)."""

    index: int
    item: CatalogItem
    stem: str


def plan_jobs(items: Sequence[CatalogItem], folder: OutputFolder) -> list[tuple[int, CatalogItem, str | None]]:
    """``(position, item, stem)`` per item, stems claimed in input order (None: ``skip`` policy
    and outputs exist), so they do not depend on which image finishes first."""
    return [(pos, item, folder.claim(item.sku or item.path.name, item.tag, source=str(item.path)))
            for pos, item in enumerate(items)]


def _process_one(processor: Any, job: CatalogJob, out: Path, dry_run: bool, max_deaths: int) -> tuple[dict[str, Any], float]:
    """One job to its record. A worker death (Ray engine: the actor's process died holding this
    image) is retried, on a restarted or another actor, up to ``max_deaths`` times; then the image
    gets a ``failed`` record naming the cause, so one poisonous input cannot stop the catalog. An
    internal error (a bug) gets a ``failed`` record saying so, with its type; the traceback goes
    to the log. A model that cannot load stops the run (:class:`ModelUnavailable`)."""
    t0 = time.perf_counter()
    deaths = 0
    it = job.item
    while True:
        try:
            rec = processor.process(it.path, out, stem=job.stem, dry_run=dry_run, classes=it.classes,
                                    actions=it.actions, mask=it.mask, product_class=it.product_class,
                                    **({"profiles": it.profiles} if it.profiles else {}))
            return rec, time.perf_counter() - t0
        except ModelUnavailable:
            raise
        except Exception as e:
            if not getattr(e, "worker_died", False):
                log.error("internal error on %s", it.path, exc_info=e)
                rec = write_failure(out, job.stem, str(it.path), internal_error_message(e),
                                    {"stage": "internal", "error_type": type(e).__name__,
                                     "rules": {"sha256": getattr(processor, "rules_hash", None)}})
                return rec, time.perf_counter() - t0
            deaths += 1
            if exhausted(deaths, max_deaths):
                rec = write_failure(out, job.stem, str(it.path), death_message(deaths),
                                    {"stage": "worker", "attempts": deaths, "last_error": str(e),
                                     "rules": {"sha256": getattr(processor, "rules_hash", None)}})
                return rec, time.perf_counter() - t0


def process_jobs(processor: Any, jobs: list[CatalogJob], out: Path, *, dry_run: bool = False, concurrency: int = 1,
                 max_deaths: int = 3) -> Iterator[tuple[CatalogJob, dict[str, Any], float]]:
    """Yield ``(job, record, seconds)`` as each job finishes, each job exactly once.

    ``concurrency`` 1 (the local engine): in order, in the calling thread. More (the Ray engine):
    up to that many jobs in flight on a thread each, yielded in completion order; the processor
    itself hands them to actors."""
    if concurrency <= 1:
        for job in jobs:
            yield (job, *_process_one(processor, job, out, dry_run, max_deaths))
        return
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    todo = iter(jobs)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="product-studio-run")
    running: dict[Any, CatalogJob] = {}
    try:
        while True:
            while len(running) < concurrency:
                job = next(todo, None)
                if job is None:
                    break
                running[pool.submit(_process_one, processor, job, out, dry_run, max_deaths)] = job
            if not running:
                return
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                yield (job, *fut.result())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def plan_catalog(settings: Any, paths: Iterable[Path], *, rules: Path | None = None, actions: list[Action] | None = None,
                 tag: str = "", class_name: str | None = None, mask: Path | None = None,
                 profiles: Sequence[str] | None = None, recursive: bool = False,
                 extra_items: Sequence[CatalogItem] = ()) -> tuple[RuleSet, list[CatalogItem]]:
    """The rule set and the items of one catalog run, checked before any model loads.

    ``actions`` given: one operation by hand on ``class_name`` (every input gets them, outputs
    named STEM-``tag``); the settings' classes (and ``class_name``, if it is not one of them) are
    scored, so a neighbour that looks more like another class is not taken for it. Otherwise the
    rule file ``rules`` (default: the settings' ``paths.rules``); ``class_name`` must be one of its
    classes. ``mask``: a product mask file or a folder of masks (skips detection). ``extra_items``
    are appended as they are. Raises :class:`SettingsError` (bad rules, class, profile name) or
    :class:`BadInput` (a missing mask or input, a bad catalog CSV)."""
    if mask is not None and not mask.exists():
        raise BadInput(f"mask {mask}: no such file or folder")
    if actions is not None:
        classes = [c.model_dump() for c in settings.detect.classes]
        if class_name not in {c["name"] for c in classes}:
            classes.append({"name": class_name})
        ruleset = rules_from_dict({"classes": classes, "rules": []}, settings)
    else:
        ruleset = load_rules(rules or settings.resolve_path(settings.paths.rules), settings)
        if class_name is not None and class_name not in {c.name for c in ruleset.classes}:
            raise SettingsError(ruleset.path, [("classes", f"{class_name!r} is not a class of the rules "
                                                f"({', '.join(c.name for c in ruleset.classes)})", None)])
    items = collect_items(paths, settings, recursive)
    for n in profiles or ():
        get_profile(n, settings)  # an unknown profile fails here, not after the first image
    for item in items:
        if actions is not None:
            item.actions, item.tag = actions, tag
        if class_name is not None:
            item.product_class = class_name
            if mask is None and actions is None:
                item.classes = [class_name]
        if mask is not None:
            item.mask = mask
        if profiles:
            item.profiles = list(profiles)
    return ruleset, [*items, *extra_items]


@dataclass
class CatalogSummary:
    """What one catalog run did. ``entries``: the manifest entries in input order; ``counts``:
    status (edited, planned, skipped, failed, exists) -> images; ``notes``: warnings from the
    records (fill fallbacks, operation warnings), one line each; ``stage_seconds``: seconds per
    processing stage summed over the images; ``report``: the contact sheet ``OUT/report.html``."""

    out_dir: Path
    entries: list[dict[str, Any]]
    counts: dict[str, int]
    notes: list[str]
    stage_seconds: dict[str, float]
    report: Path

    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)


def record_notes(name: str, record: dict[str, Any] | None) -> list[str]:
    """The warnings a record carries (fill fallbacks and warnings, operation warnings), one line each."""
    out = []
    for a in (record or {}).get("actions") or []:
        r, who = a.get("record") or {}, f"{name}: {a.get('op')} on {a.get('label')}"
        fill = r.get("fill")
        fill = fill if isinstance(fill, dict) else {}  # frame's record has `fill`, its product share, a number
        if fill.get("fallback"):
            out.append(f"{who}: {fill.get('used')} fill used as fallback: {fill.get('fallback_reason')}")
        out.extend(f"{who}: {w}" for w in [fill.get("warning"), *(r.get("warnings") or [])] if w)
    return out


def run_catalog(processor: Any, items: Sequence[CatalogItem], out: Path, *, on_conflict: str = "suffix",
                dry_run: bool = False, concurrency: int = 1, max_deaths: int = 3, note: str = "",
                on_entry: Callable[[str, dict[str, Any]], None] | None = None) -> CatalogSummary:
    """Run ``items`` through ``processor`` (a :class:`~pipeline.run.process.Processor` or the Ray
    engine's) into ``out``: output stems claimed in input order under ``on_conflict`` (suffix |
    skip | overwrite), one ``manifest.jsonl`` line per input as it finishes, ``report.html`` at
    the end. ``on_entry(input name, manifest entry)`` is called as each input finishes (progress).
    The processor is not closed here. Raises :class:`ModelUnavailable` when a model cannot load."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out / "manifest.jsonl")
    jobs: list[CatalogJob] = []
    order: dict[int, int] = {}  # job index -> input position (the report lists inputs in order)
    entries: list[tuple[int, dict[str, Any]]] = []
    stage: dict[str, float] = {}
    notes: list[str] = []

    def finished(pos: int, name: str, ent: dict[str, Any], rec: dict[str, Any] | None = None) -> None:
        notes.extend(record_notes(name, rec))
        manifest.add(ent)
        entries.append((pos, ent))
        if on_entry is not None:
            on_entry(name, ent)

    try:
        for pos, item, stem in plan_jobs(items, OutputFolder(out, on_conflict)):
            if stem is None:
                finished(pos, item.path.name, manifest_entry(item, None, None, 0.0, status="exists"))
                continue
            order[len(jobs)] = pos
            jobs.append(CatalogJob(len(jobs), item, stem))
        for job, rec, seconds in process_jobs(processor, jobs, out, dry_run=dry_run, concurrency=concurrency,
                                              max_deaths=max_deaths):
            for k, v in (rec.get("timings") or {}).items():
                if k != "total":
                    stage[k] = stage.get(k, 0.0) + v
            finished(order[job.index], job.item.path.name, manifest_entry(job.item, job.stem, rec, seconds), rec)
    finally:
        manifest.close()
    in_order = [ent for _, ent in sorted(entries, key=lambda e: e[0])]
    report = write_report(out, in_order, note=note)
    counts: dict[str, int] = {}
    for ent in in_order:
        counts[ent["status"]] = counts.get(ent["status"], 0) + 1
    return CatalogSummary(out, in_order, counts, notes, stage, report)


class Manifest:
    """``OUT/manifest.jsonl``: one line per input, appended and flushed as each one finishes."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def add(self, entry: dict[str, Any]) -> None:
        self._f.write(json.dumps(entry, default=str) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def manifest_entry(item: CatalogItem, stem: str | None, record: dict[str, Any] | None, seconds: float,
                   status: str | None = None) -> dict[str, Any]:
    rec = record or {}
    status = status or rec.get("status", "failed")
    folder = {"skipped": "skipped/", "failed": "failed/"}.get(status, "")
    return {
        "input": str(item.path), "sku": item.sku, "stem": stem, "status": status,
        "sha256": (rec.get("input") or {}).get("sha256"),
        "record": f"{folder}{stem}.json" if stem and record else None,
        "reason": (rec.get("detect") or {}).get("reason") if status == "skipped" else None,
        "error": rec.get("error"), "seconds": round(seconds, 3),
        **({"checks": {p["name"]: {"file": p["file"], "passed": p["check"]["passed"],
                                   "failures": p["check"]["failures"], "figures": p["check"]["figures"]}
                       for p in rec["profiles"]}} if rec.get("profiles") else {}),
    }


# --------------------------------------------------------------------------------------------
# Contact sheet


def _thumb(src: Path, dst: Path, size: int = 320) -> str | None:
    try:
        im = load_image(src).image.convert("RGB")
    except (ImageLoadError, OSError):
        return None
    im.thumbnail((size, size))
    save_image(im, dst, quality=85)
    return dst.name


def write_report(out: Path, entries: list[dict[str, Any]], title: str = "Product Studio run", note: str = "") -> Path:
    """``OUT/report.html``: static, self-contained apart from relative thumbnails in ``OUT/thumbs/``.

    Per image: input | overlay | output | each profile's output with its compliance figures
    (failures highlighted) | classes and scores, actions, QA figures and timings; skipped and
    failed images in their own sections with the reason. ``note``: a line under the title."""
    thumbs = out / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    sections: dict[str, list[str]] = {"edited": [], "planned": [], "skipped": [], "failed": [], "exists": []}
    e = html.escape
    for ent in entries:
        status, stem = ent["status"], ent.get("stem")
        rec: dict[str, Any] = {}
        if ent.get("record") and (out / ent["record"]).exists():
            rec = json.loads((out / ent["record"]).read_text())
        folder = out / {"skipped": "skipped", "failed": "failed"}.get(status, "")
        cells = []
        for kind, src in (("input", Path(ent["input"])),
                          ("overlay", folder / f"{stem}.overlay.png" if stem else None),
                          ("output", out / f"{stem}.png" if stem and status == "edited" else None)):
            name = _thumb(src, thumbs / f"{stem}.{kind}.jpg") if src is not None and src.exists() else None
            cells.append(f'<td><img src="thumbs/{e(name)}" alt="{kind}" loading="lazy"></td>' if name else "<td>-</td>")
        det = rec.get("detect") or {}
        found = ", ".join(f"{d['label']} {d['score']:.2f}" for d in det.get("detections", [])) or "-"
        best = ", ".join(f"{k} {v:.2f}" for k, v in (det.get("best_scores") or {}).items())
        acts = rec.get("actions") or rec.get("plan") or []
        act_txt = "; ".join(f"{a['op']} {a['label']} ({a.get('rule_name') or 'rule ' + str(a.get('rule'))})" for a in acts) or "-"
        qa = []
        gate = rec.get("qa")
        if gate:
            qa.append(f"{len(gate['checks'])} checks passed" if gate["passed"] else
                      "FAILED " + ", ".join(c["name"] for c in gate["checks"] if not c["passed"]))
        for a in rec.get("actions") or []:
            r = a.get("record") or {}
            fill = r.get("fill")
            fill = fill if isinstance(fill, dict) else {}  # frame's `fill` is a number
            if fill.get("scores"):
                qa.append(f"re-check {fill['scores'][-1]:.2f}" + (" (fallback)" if fill.get("fallback") else ""))
            if r.get("warnings"):
                qa.extend(r["warnings"])
        shop = []
        for prof in rec.get("profiles") or []:
            chk = prof["check"]
            src_p = out / prof["file"]
            name = _thumb(src_p, thumbs / f"{stem}.{prof['name']}.jpg") if src_p.exists() else None
            cls = "check pass" if chk["passed"] else "check fail"
            img = f'<img src="thumbs/{e(name)}" alt="{e(prof["name"])} output">' if name else "-"
            shop.append(f'<div class="{cls}" data-profile="{e(prof["name"])}"><b>{e(prof["name"])}</b> '
                        f'<a href="{e(prof["file"])}">{e(prof["file"])}</a><br>{img}<br>{e(summary(chk))}</div>')
        shop_cell = f"<td>{''.join(shop) or '-'}</td>"
        timing = ", ".join(f"{k} {v:.2f}s" for k, v in (rec.get("timings") or {}).items())
        why = ent.get("reason") or ent.get("error") or det.get("reason") or ""
        info = (f"<td><b>{e(Path(ent['input']).name)}</b>{' / ' + e(ent['sku']) if ent.get('sku') else ''}"
                f"<br>found: {e(found)}<br>best: {e(best)}<br>actions: {e(act_txt)}"
                f"{'<br>QA: ' + e('; '.join(qa)) if qa else ''}{'<br>why: ' + e(why) if why else ''}"
                f"<br><small>{e(timing)}</small></td>")
        sections.setdefault(status, []).append(f'<tr class="input-row">{cells[0]}{cells[1]}{cells[2]}{shop_cell}{info}</tr>')
    counts = ", ".join(f"{k} {len(v)}" for k, v in sections.items() if v)
    n_fail = sum(not c["passed"] for ent in entries for c in (ent.get("checks") or {}).values())
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;width:100%}"
             "td,th{border:1px solid #ccc;padding:4px;vertical-align:top}img{max-width:240px}td:last-child{min-width:18em}"
             "h2{margin-top:1.5em}.check{padding:4px;margin:2px 0}.check.pass{background:#e6f4ea}"
             ".check.fail{background:#fce8e6;color:#a50e0e;border:2px solid #d93025}"
             "img.broken{outline:3px dashed #d93025;min-width:80px;min-height:20px}</style>"
             # A thumbnail that does not load is marked, so a missing file is visible, not blank.
             "<script>addEventListener('load',()=>{for(const i of document.images){const ok=i.complete&&"
             "i.naturalWidth>0;i.dataset.loaded=ok?'yes':'no';if(!ok)i.classList.add('broken')}"
             "document.body.dataset.ready='yes'})</script></head><body>",
             f"<h1>{e(title)}</h1>" + (f"<p id=\"note\">{e(note)}</p>" if note else "")
             + f"<p id=\"summary\">{e(counts)}{', ' + e(str(n_fail)) + ' profile check(s) failed' if n_fail else ''}</p>"]
    for name, rows in sections.items():
        if not rows:
            continue
        parts.append(f'<h2 id="{name}">{name.capitalize()} ({len(rows)})</h2>'
                     "<table><tr><th>input</th><th>overlay</th><th>output</th><th>shop outputs and checks</th><th>details</th></tr>"
                     + "".join(rows) + "</table>")
    parts.append("</body></html>")
    return atomic_write_text(out / "report.html", "\n".join(parts) + "\n")
