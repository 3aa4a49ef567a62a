"""Rule files: which product classes to detect and what to do with each.

Semantics (Hazel / paperless-ngx style): for every detection of an image, best score first, the
rules are tried in file order. The first rule whose ``match`` fits (class, and optionally minimum
score and minimum/maximum size as a share of the image) contributes its ``actions``; evaluation
stops there unless that rule says ``continue: true``. An image with detections that no rule
matches follows ``no_match`` (``skip``: recorded as skipped with the reason; ``copy``: the input
is written unchanged as the output). ``defaults`` hold per-action parameters that every action of
that kind starts from (over the settings file's per-operation defaults).

A bad file raises :class:`~pipeline.settings.SettingsError` naming the file, the line and field,
and the reason: unknown class in a rule, unknown action, bad parameter type or range, missing
LoRA file, ...
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.settings import (
    DisplaceSettings,
    EnhanceSettings,
    ProductClass,
    RotateSettings,
    Settings,
    SettingsError,
    read_yaml_mapping,
    validation_problems,
    yaml_line,
)

ACTIONS = ("enhance", "rotate", "displace")
# Parameters an action takes besides its settings section's fields.
ACTION_EXTRA: dict[str, dict[str, Any]] = {
    "enhance": {"loras": list, "tag": str, "prompt": str},
    "rotate": {"azimuth": (int, float), "polar": (int, float)},
    "displace": {"x": (int, float, str), "y": (int, float, str)},
}
SECTION_MODEL = {"enhance": EnhanceSettings, "rotate": RotateSettings, "displace": DisplaceSettings}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Match(_Strict):
    class_: str | list[str] = Field(alias="class", description="class name, list of names, or '*' for any")
    min_score: float | None = Field(None, ge=0.0, le=1.0)
    min_size: float | None = Field(None, ge=0.0, le=1.0, description="mask area as a share of the image")
    max_size: float | None = Field(None, ge=0.0, le=1.0)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @property
    def classes(self) -> list[str]:
        return [self.class_] if isinstance(self.class_, str) else list(self.class_)

    @model_validator(mode="after")
    def _sizes(self) -> "Match":
        if self.min_size is not None and self.max_size is not None and self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} is larger than max_size {self.max_size}")
        return self

    def fits(self, label: str, score: float, size: float) -> bool:
        if "*" not in self.classes and label not in self.classes:
            return False
        if self.min_score is not None and score < self.min_score:
            return False
        if self.min_size is not None and size < self.min_size:
            return False
        if self.max_size is not None and size > self.max_size:
            return False
        return True


class Rule(_Strict):
    name: str | None = None
    match: Match
    actions: list[dict[str, dict[str, Any] | None]] = Field(min_length=1)
    continue_: bool = Field(False, alias="continue")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("actions")
    @classmethod
    def _actions(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, a in enumerate(v):
            if not isinstance(a, dict) or len(a) != 1:
                raise ValueError(f"action {i} must be a mapping with one key (one of {', '.join(ACTIONS)})")
            (op,) = a
            if op not in ACTIONS:
                raise ValueError(f"unknown action {op!r} (known: {', '.join(ACTIONS)})")
        return v


class RulesFile(_Strict):
    version: Literal[1] = 1
    classes: list[ProductClass] | None = None
    defaults: dict[str, dict[str, Any]] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    no_match: Literal["skip", "copy"] = "skip"

    @field_validator("defaults")
    @classmethod
    def _defaults(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for op in v:
            if op not in ACTIONS:
                raise ValueError(f"defaults for unknown action {op!r} (known: {', '.join(ACTIONS)})")
        return v


@dataclass(frozen=True)
class PlannedAction:
    """One action to run on one detection. ``params``: the action's options, defaults merged."""

    op: str
    params: dict[str, Any]
    rule_index: int
    rule_name: str | None
    detection_index: int
    label: str

    def to_record(self) -> dict[str, Any]:
        return {"op": self.op, "params": self.params, "rule": self.rule_index, "rule_name": self.rule_name,
                "detection": self.detection_index, "label": self.label}


@dataclass
class RuleSet:
    """A validated rule file, ready to plan with."""

    file: RulesFile
    path: Path | None
    sha256: str
    classes: list[ProductClass]
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def no_match(self) -> str:
        return self.file.no_match

    def plan(self, detections: list[Any], image_size: tuple[int, int]) -> tuple[list[PlannedAction], list[dict]]:
        """Actions for ``detections`` (objects with label, score, mask) and why each got them.

        Returns ``(actions, matches)``; ``matches`` has one entry per detection: the rules that
        matched (indices) or ``None`` when none did."""
        w, h = image_size
        area = float(w * h) or 1.0
        actions: list[PlannedAction] = []
        matches: list[dict] = []
        order = sorted(range(len(detections)), key=lambda i: -detections[i].score)
        for di in order:
            d = detections[di]
            size = float(d.mask.sum()) / area
            hit: list[int] = []
            for ri, rule in enumerate(self.file.rules):
                if not rule.match.fits(d.label, d.score, size):
                    continue
                hit.append(ri)
                for a in rule.actions:
                    (op, params), = a.items()
                    merged = {**self.defaults.get(op, {}), **(params or {})}
                    actions.append(PlannedAction(op, merged, ri, rule.name, di, d.label))
                if not rule.continue_:
                    break
            matches.append({"detection": di, "label": d.label, "score": round(float(d.score), 4),
                            "size": round(size, 4), "rules": hit or None})
        return actions, matches

    def describe(self) -> list[tuple[str, list[str]]]:
        """Readable summary: per class, what each matching rule does."""
        out = []
        for c in self.classes:
            lines = []
            for ri, r in enumerate(self.file.rules):
                if "*" not in r.match.classes and c.name not in r.match.classes:
                    continue
                cond = []
                m = r.match
                if m.min_score is not None:
                    cond.append(f"score >= {m.min_score}")
                if m.min_size is not None or m.max_size is not None:
                    cond.append(f"size {m.min_size or 0:.0%}..{m.max_size if m.max_size is not None else 1:.0%}")
                acts = []
                for a in r.actions:
                    (op, params), = a.items()
                    merged = {**self.defaults.get(op, {}), **(params or {})}
                    acts.append(f"{op}({', '.join(f'{k}={_short(v)}' for k, v in merged.items())})")
                label = f"rule {ri + 1}" + (f" '{r.name}'" if r.name else "")
                lines.append(f"{label}{' if ' + ' and '.join(cond) if cond else ''}: {'; '.join(acts)}"
                             + (" (then continue)" if r.continue_ else ""))
            if not lines:
                lines.append(f"no rule: {self.no_match}")
            out.append((c.name, lines))
        return out


def _short(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    if isinstance(v, dict):
        if "path" in v:
            return f"{Path(str(v['path'])).name}x{v.get('weight', 1.0)}"
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    return str(v)


# --------------------------------------------------------------------------------------------
# Loading and validation


def _check_params(op: str, params: dict[str, Any], settings: Settings, base_dir: Path,
                  where: tuple[Any, ...], text: str, problems: list) -> dict[str, Any]:
    """Validate one action's parameters against its settings section + extras. Returns them with
    LoRA paths resolved."""
    extras = ACTION_EXTRA[op]
    model = SECTION_MODEL[op]
    section = {k: v for k, v in params.items() if k not in extras}
    out = dict(params)
    unknown = [k for k in section if k not in model.model_fields]
    for k in unknown:
        loc = (*where, k)
        problems.append((".".join(map(str, loc)), f"unknown parameter for {op} (known: "
                         f"{', '.join(sorted([*model.model_fields, *extras]))})", yaml_line(text, loc)))
    try:
        model.model_validate({**getattr(settings, op).model_dump(), **{k: v for k, v in section.items() if k not in unknown}})
    except ValidationError as e:
        for f, reason, _ in validation_problems(e, text):
            loc = (*where, *f.split("."))
            problems.append((".".join(map(str, loc)), reason, yaml_line(text, loc)))
    for k, typ in extras.items():
        if k in params and not isinstance(params[k], typ) or (k in params and isinstance(params[k], bool)):
            loc = (*where, k)
            problems.append((".".join(map(str, loc)), f"expected {_typename(typ)}, got {params[k]!r}", yaml_line(text, loc)))
    if op == "rotate":
        max_polar = params.get("max_polar", getattr(settings.rotate, "max_polar", 90.0))
        max_polar = min(float(max_polar), 90.0) if isinstance(max_polar, (int, float)) else 90.0
        for k, lim in (("azimuth", 180.0), ("polar", max_polar)):
            v = params.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not -lim <= v <= lim:
                loc = (*where, k)
                problems.append((".".join(map(str, loc)), f"must be within -{lim:g}..{lim:g} degrees (got {v})",
                                 yaml_line(text, loc)))
    if op == "displace":
        from pipeline.composite import parse_offset

        for k in ("x", "y"):
            if k in params and not isinstance(params[k], bool):
                try:
                    parse_offset(params[k], 1000)
                except (ValueError, TypeError) as e:
                    loc = (*where, k)
                    problems.append((".".join(map(str, loc)), str(e), yaml_line(text, loc)))
    if op == "enhance" and isinstance(params.get("loras"), list):
        resolved = []
        for i, l in enumerate(params["loras"]):
            loc = (*where, "loras", i)
            if isinstance(l, str):
                l = {"path": l}
            if not isinstance(l, dict) or "path" not in l or set(l) - {"path", "weight"}:
                problems.append((".".join(map(str, loc)), "a LoRA is a path or {path: FILE, weight: NUMBER}",
                                 yaml_line(text, loc)))
                continue
            w = l.get("weight", 1.0)
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                problems.append((".".join(map(str, (*loc, "weight"))), f"expected a number, got {w!r}",
                                 yaml_line(text, (*loc, "weight"))))
            p = Path(str(l["path"])).expanduser()
            p = p if p.is_absolute() else (base_dir / p)
            if not p.is_file():
                problems.append((".".join(map(str, (*loc, "path"))), f"LoRA file not found: {p}",
                                 yaml_line(text, (*loc, "path"))))
            resolved.append({"path": str(p), "weight": w})
        out["loras"] = resolved
    return out


def _available(op: str) -> bool:
    from pipeline.run_edit import op_handler

    try:
        op_handler(op)
    except ValueError:
        return False
    return True


def _typename(t: Any) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    names = {int: "a number", float: "a number", str: "text", list: "a list"}
    return " or ".join(dict.fromkeys(names.get(x, x.__name__) for x in ts))


def load_rules(path: str | Path, settings: Settings) -> RuleSet:
    """Read, validate and resolve a rule file. Raises SettingsError (file, line/field, reason)."""
    path = Path(path)
    data, text = read_yaml_mapping(path)
    try:
        rf = RulesFile.model_validate(data)
    except ValidationError as e:
        raise SettingsError(path, validation_problems(e, text)) from None
    return _resolve(rf, path, text, settings)


def rules_from_dict(data: dict[str, Any], settings: Settings, base_dir: Path | None = None) -> RuleSet:
    """A RuleSet from an in-memory mapping (tests, catalog overrides)."""
    import yaml

    text = yaml.safe_dump(data, sort_keys=False)
    try:
        rf = RulesFile.model_validate(data)
    except ValidationError as e:
        raise SettingsError("<rules>", validation_problems(e, text)) from None
    return _resolve(rf, None, text, settings, base_dir)


def default_rules(settings: Settings) -> RuleSet:
    """No rule file: detect the settings' classes, no actions (every detection -> no_match skip)."""
    return rules_from_dict({"rules": []}, settings)


def _resolve(rf: RulesFile, path: Path | None, text: str, settings: Settings, base_dir: Path | None = None) -> RuleSet:
    base = base_dir or (path.resolve().parent if path else Path.cwd())
    problems: list[tuple[str, str, int | None]] = []
    classes = rf.classes if rf.classes is not None else list(settings.detect.classes)
    names = {c.name for c in classes}
    if rf.classes is not None:
        dup = sorted({c.name for c in classes if sum(x.name == c.name for x in classes) > 1})
        if dup:
            problems.append(("classes", f"class names must be unique; repeated: {', '.join(dup)}", yaml_line(text, ("classes",))))
    defaults = {}
    for op, params in rf.defaults.items():
        defaults[op] = _check_params(op, params or {}, settings, base, ("defaults", op), text, problems)
    for ri, rule in enumerate(rf.rules):
        for cname in rule.match.classes:
            if cname != "*" and cname not in names:
                loc = ("rules", ri, "match", "class")
                problems.append((".".join(map(str, loc)), f"unknown class {cname!r} (classes: {', '.join(sorted(names))})",
                                 yaml_line(text, loc)))
        for ai, a in enumerate(rule.actions):
            (op, params), = a.items()
            if not _available(op):
                loc = ("rules", ri, "actions", ai, op)
                problems.append((".".join(map(str, loc)), f"action {op!r} is not available in this version",
                                 yaml_line(text, loc)))
                continue
            merged = {**rf.defaults.get(op, {}), **(params or {})}
            a[op] = _check_params(op, params or {}, settings, base, ("rules", ri, "actions", ai, op), text, problems)
            if op == "rotate" and merged.get("azimuth") is None and merged.get("polar") is None:
                loc = ("rules", ri, "actions", ai, op)
                problems.append((".".join(map(str, loc)), "rotate needs azimuth and/or polar", yaml_line(text, loc)))
    if problems:
        raise SettingsError(path or "<rules>", problems)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return RuleSet(file=rf, path=path, sha256=digest, classes=list(classes), defaults=defaults)
