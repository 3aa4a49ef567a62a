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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.ops.actions import Action, OPS as ACTIONS, chain_problems, parse_action, merge_given
from pipeline.errors import ParamsError
from pipeline.settings import ProductClass, Settings, SettingsError, read_yaml_mapping, validation_problems, yaml_line, SettingsDeprecation, deprecation_note
from pipeline.ops.profiles import all_profiles


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
    # profiles before actions: the actions' validator looks at them.
    profiles: list[str] = Field(default_factory=list, description="marketplace profiles to write for a match "
                                "(STEM.PROFILE.EXT each), after the actions")
    actions: list[dict[str, dict[str, Any] | None]] = Field(default_factory=list)
    continue_: bool = Field(False, alias="continue")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("actions")
    @classmethod
    def _actions(cls, v: list[dict[str, Any]], info: ValidationInfo) -> list[dict[str, Any]]:
        if not v and not info.data.get("profiles"):
            raise ValueError("a rule needs at least 1 action (or profiles)")
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
    """One action to run on one detection (``detection_index`` into the detections; ``label``
    its class). ``rule_index`` -1: not from a rule (catalog row, ``run --op``)."""

    action: Action
    rule_index: int
    rule_name: str | None
    detection_index: int
    label: str

    @property
    def op(self) -> str:
        return self.action.op

    def to_record(self) -> dict[str, Any]:
        return {**self.action.to_record(), "rule": self.rule_index if self.rule_index >= 0 else None,
                "rule_name": self.rule_name, "detection": self.detection_index, "label": self.label}


@dataclass
class RuleSet:
    """A validated rule file, ready to plan with."""

    file: RulesFile
    path: Path | None
    sha256: str
    classes: list[ProductClass]
    actions: list[list[Action]] = field(default_factory=list)  # per rule, defaults merged, validated

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
                for a in self.actions[ri]:
                    actions.append(PlannedAction(a, ri, rule.name, di, d.label))
                if not rule.continue_:
                    break
            profiles = [n for ri in hit for n in self.file.rules[ri].profiles]
            matches.append({"detection": di, "label": d.label, "score": round(float(d.score), 4),
                            "size": round(size, 4), "rules": hit or None,
                            **({"profiles": list(dict.fromkeys(profiles))} if profiles else {})})
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
                acts = [a.describe() for a in self.actions[ri]] + [f"profile {n}" for n in r.profiles]
                label = f"rule {ri + 1}" + (f" '{r.name}'" if r.name else "")
                lines.append(f"{label}{' if ' + ' and '.join(cond) if cond else ''}: {'; '.join(acts)}"
                             + (" (then continue)" if r.continue_ else ""))
            if not lines:
                lines.append(f"no rule: {self.no_match}")
            out.append((c.name, lines))
        return out


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

    def add(loc: tuple[Any, ...], reason: str) -> None:
        problems.append((".".join(map(str, loc)), reason, yaml_line(text, loc)))

    def deprecated(op: str, where: tuple[Any, ...]) -> Callable[[str, str], None]:
        def note(old: str, new: str) -> None:
            line = yaml_line(text, (*where, old))
            warnings.warn(deprecation_note(f"{path or '<rules>'}:{line}" if line else str(path or "<rules>"), op, old,
                                           new), SettingsDeprecation, stacklevel=2)
        return note

    def parse(op: str, given: dict[str, Any], where: tuple[Any, ...]) -> Action | None:
        try:
            return parse_action(op, given, settings, bases=(base,), on_deprecated=deprecated(op, where))
        except ParamsError as e:
            for f, reason in e.problems:
                add((*where, *[int(x) if x.isdigit() else x for x in f.split(".") if x]), reason)
            return None

    classes = rf.classes if rf.classes is not None else list(settings.detect.classes)
    names = {c.name for c in classes}
    if rf.classes is not None:
        dup = sorted({c.name for c in classes if sum(x.name == c.name for x in classes) > 1})
        if dup:
            add(("classes",), f"class names must be unique; repeated: {', '.join(dup)}")
    for op, params in rf.defaults.items():
        parse(op, params or {}, ("defaults", op))
    per_rule: list[list[Action]] = []
    for ri, rule in enumerate(rf.rules):
        for cname in rule.match.classes:
            if cname != "*" and cname not in names:
                add(("rules", ri, "match", "class"), f"unknown class {cname!r} (classes: {', '.join(sorted(names))})")
        acts: list[Action] = []
        for ai, a in enumerate(rule.actions):
            (op, params), = a.items()
            where = ("rules", ri, "actions", ai, op)
            merged = merge_given(rf.defaults.get(op) or {}, params or {})
            if op == "rotate" and merged.get("azimuth") is None and merged.get("polar") is None:
                add(where, "rotate needs azimuth and/or polar")
            act = parse(op, merged, where)
            if act is not None:
                acts.append(act)
        per_rule.append(acts)
        if rule.profiles:
            known = all_profiles(settings)
            for pi, n in enumerate(rule.profiles):
                if n not in known:
                    add(("rules", ri, "profiles", pi), f"unknown profile {n!r} (known: {', '.join(sorted(known))})")
    if not problems:
        _check_chains(rf, per_rule, classes, add)
    if problems:
        raise SettingsError(path or "<rules>", problems)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return RuleSet(file=rf, path=path, sha256=digest, classes=list(classes), actions=per_rule)


def _check_chains(rf: RulesFile, per_rule: list[list[Action]], classes: list[ProductClass], add: Any) -> None:
    """Refuse what cannot be honoured: for each class, the longest chain of actions one detection
    may get (every rule that may match it, in order, until one without conditions stops the
    evaluation) goes through :func:`pipeline.ops.actions.chain_problems`."""
    for c in classes:
        chain: list[tuple[int, int, Action]] = []
        for ri, rule in enumerate(rf.rules):
            m = rule.match
            if "*" not in m.classes and c.name not in m.classes:
                continue
            chain.extend((ri, ai, a) for ai, a in enumerate(per_rule[ri]))
            unconditional = m.min_score is None and m.min_size is None and m.max_size is None
            if unconditional and not rule.continue_:
                break
        for idx, reason in chain_problems([a for _, _, a in chain]):
            ri, ai, a = chain[idx]
            add(("rules", ri, "actions", ai, a.op), f"class {c.name!r}: {reason}")
