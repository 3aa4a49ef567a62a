"""The operation table and typed actions.

One entry per operation: its params model (a :class:`~pipeline.ops.edits.OpParams` subclass that
names its settings section) and its function ``run(image, product_mask, label, params, ctx) ->
Edit``. Rule files, ``edit OP`` flags and catalog CSV action strings all become :class:`Action`
objects through :func:`parse_action`; errors come back as :class:`~pipeline.errors.ParamsError`
with the field of each problem, which each caller turns into a file/line, a row/column or a flag.

Adding an operation: write its params model and its function, add one line to ``OPERATIONS``.
"""

from __future__ import annotations

import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pydantic import ValidationError

from pipeline.ops.background import BackgroundParams, run_background
from pipeline.ops.displace import DisplaceParams, run_displace
from pipeline.ops.edits import Edit, EditContext, OpParams
from pipeline.ops.enhance import EnhanceParams, run_enhance
from pipeline.errors import ParamsError
from pipeline.ops.frame import FrameParams, run_frame
from pipeline.ops.rotate import RotateParams, run_rotate
from pipeline.settings import LEGACY_FILL_KEYS, FillKeyConflict, SettingsDeprecation, deprecation_note, error_loc, error_reason, legacy_loc, merge_nested, nest_fill


@dataclass(frozen=True)
class Operation:
    """One operation: its name, params model and function."""

    name: str
    params: type[OpParams]
    run: Callable[..., Edit]
    moves: bool = False  # the product may end somewhere else (or partly outside the frame)
    resizes: bool = False  # the result has another size (the Edit carries its Transform)

    @property
    def own_fields(self) -> list[str]:
        return [k for k in self.params.model_fields if k != "settings"]


OPERATIONS: dict[str, Operation] = {
    "enhance": Operation("enhance", EnhanceParams, run_enhance),
    "rotate": Operation("rotate", RotateParams, run_rotate, moves=True),
    "displace": Operation("displace", DisplaceParams, run_displace, moves=True),
    "background": Operation("background", BackgroundParams, run_background),
    "frame": Operation("frame", FrameParams, run_frame, resizes=True),
}
OPS = tuple(OPERATIONS)


@dataclass(frozen=True)
class Action:
    """One parsed action: ``op``, its validated ``params`` (the op's settings section with this
    action's overrides resolved into ``params.settings``) and ``given``, the options as written."""

    op: str
    params: OpParams
    given: dict[str, Any] = field(default_factory=dict)

    @property
    def operation(self) -> Operation:
        return OPERATIONS[self.op]

    def run(self, image: Any, mask: Any, label: str, ctx: EditContext) -> Edit:
        return self.operation.run(image, mask, label, self.params, ctx)

    def to_record(self) -> dict[str, Any]:
        """JSON-able: the op, the options as given (LoRAs resolved to their files) and the
        settings section in force for it."""
        return {"op": self.op, "options": {**_jsonable(self.given), **self.params.own()},
                "settings": self.params.settings.model_dump(mode="json")}

    def describe(self) -> str:
        opts = {**_jsonable(self.given), **self.params.own()}
        return f"{self.op}({', '.join(f'{k}={_short(v)}' for k, v in opts.items())})"


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _short(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    if isinstance(v, dict):
        if "path" in v:
            return f"{Path(str(v['path'])).name}x{v.get('weight', 1.0)}"
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    return str(v)


def _problems(err: ValidationError, section: str = "", given: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """(dotted field, reason) per error; an old flat fill key in ``given`` is named as written."""
    return [(".".join(str(x) for x in legacy_loc((section, *error_loc(e)), {section: given or {}})[1:]),
             error_reason(e, "unknown parameter")) for e in err.errors()]


def _nested(section: str, given: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Section overrides as written -> nested: dotted keys (``fill.steps=10``, from flags and CSV
    cells) become dicts; a fill section's ``fill: NAME`` and old flat fill keys go into ``fill``."""
    out: dict[str, Any] = {}
    for k, v in given.items():
        if "." in k:
            head, *rest = k.split(".")
            node = out.setdefault(head, {})
            if not isinstance(node, dict):
                node = out[head] = {"backend": node} if head == "fill" else {}
            for part in rest[:-1]:
                node = node.setdefault(part, {})
            node[rest[-1]] = v
        elif k == "fill" and isinstance(out.get("fill"), dict) and not isinstance(v, dict):
            out["fill"]["backend"] = v
        else:
            out[k] = merge_nested(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    if section in LEGACY_FILL_KEYS:
        return nest_fill(section, out)
    return out, []


def merge_given(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Options ``over`` on top of ``base`` (a rule's action over the rule file's defaults): nested
    mappings merge key by key; ``fill: NAME`` facing a fill mapping counts as ``{backend: NAME}``."""
    def as_map(v: Any) -> Any:
        return {"backend": v} if isinstance(v, (str, list, tuple)) else v

    b, o = dict(base), dict(over)
    if isinstance(b.get("fill"), dict) or isinstance(o.get("fill"), dict):
        if "fill" in b and "fill" in o:
            b["fill"], o["fill"] = as_map(b["fill"]), as_map(o["fill"])
    return merge_nested(b, o)


def parse_action(op: str, given: Mapping[str, Any] | None, settings: Any, *,
                 bases: Sequence[str | Path | None] = (None,),
                 on_deprecated: Callable[[str, str], None] | None = None) -> Action:
    """Validate ``given`` (the options as written: rule file, flags or a CSV cell) for ``op``.

    Keys are the operation's own fields or fields of its settings section (overrides for this
    action). ``bases``: where a relative file (a LoRA) is looked up, in order; None = the working
    directory. Dotted keys reach into a nested field (``fill.steps``); an old flat fill key
    (``steps`` for displace, ``fill_steps`` for rotate) still works and is reported to
    ``on_deprecated(old, new)``, by default as a :class:`SettingsDeprecation` warning.
    Raises :class:`ParamsError` naming every bad field, before any model is loaded."""
    spec = OPERATIONS.get(op)
    if spec is None:
        raise ParamsError(None, [("", f"unknown action {op!r} (known: {', '.join(OPS)})")])
    given = {k: v for k, v in (given or {}).items() if v is not None}
    section_name = spec.params.section
    section_now = getattr(settings, section_name)
    section_model = type(section_now)
    own = set(spec.own_fields)
    problems: list[tuple[str, str]] = []
    own_vals, section_vals = {}, {}
    legacy = LEGACY_FILL_KEYS.get(section_name, {})
    for k, v in given.items():
        if k in own:
            own_vals[k] = v
        elif (k.split(".")[0] in section_model.model_fields or k in legacy) and k != "classes":
            section_vals[k] = v
        else:
            known = sorted({*own, *section_model.model_fields} - {"classes"})
            problems.append((k, f"unknown parameter for {op} (known: {', '.join(known)})"))
    section = None
    try:
        nested, moved = _nested(section_name, section_vals)
        for old, new in moved:
            if on_deprecated is not None:
                on_deprecated(old, new)
            else:
                warnings.warn(deprecation_note(op, section_name, old, new), SettingsDeprecation, stacklevel=2)
        section = section_model.model_validate(merge_nested(section_now.model_dump(), nested)) if section_vals \
            else section_now
    except FillKeyConflict as e:
        problems.append(("fill", str(e)))
    except ValidationError as e:
        problems.extend(_problems(e, section_name, section_vals))
    if section is not None:
        try:
            params = spec.params.model_validate({**own_vals, "settings": section}, context={"bases": tuple(bases)})
        except ValidationError as e:
            problems.extend(_problems(e))
    if problems:
        raise ParamsError(op, problems)
    return Action(op, params, dict(given))


def _value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    return v


def split_action_text(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``"displace x=-10% y=0; enhance seed=3"`` -> ``[("displace", {...}), ("enhance", {...})]``,
    values as numbers where they read as one. Raises :class:`ParamsError` for a malformed part."""
    out = []
    for part in [p.strip() for p in text.split(";") if p.strip()]:
        try:
            words = shlex.split(part)
        except ValueError as e:  # shlex: unbalanced quotes
            raise ParamsError(None, [("", f"cannot read {part!r}: {e}")]) from None
        op, params = words[0], {}
        for w in words[1:]:
            if "=" not in w:
                raise ParamsError(op, [("", f"action parameter {w!r} is not KEY=VALUE")])
            k, v = w.split("=", 1)
            params[k] = _value(v)
        out.append((op, params))
    return out


def parse_action_text(text: str, settings: Any, *, bases: Sequence[str | Path | None] = (None,)) -> list[Action]:
    """A catalog CSV cell (see :func:`split_action_text`) -> actions. Raises :class:`ParamsError`."""
    return [parse_action(op, params, settings, bases=bases) for op, params in split_action_text(text)]


def chain_problems(actions: Sequence[Action]) -> list[tuple[int, str]]:
    """Why a chain of actions on one product cannot be honoured: ``[(index, reason)]``.

    Each action works on where the product is after the one before (the processor tracks the
    product's mask), so most chains compose. What cannot: a ``rotate`` after a ``displace`` that
    may cut the product at the frame edge (``out_of_frame: clip``, or ``refuse`` with a share
    above 0): the novel-view model needs the whole product, and would turn a cut-off half into a
    new object."""
    out: list[tuple[int, str]] = []
    may_clip = False
    for i, a in enumerate(actions):
        if a.op == "rotate" and may_clip and (a.params.azimuth is not None or a.params.polar is not None):
            out.append((i, "rotate after a displace that may cut the product at the frame edge: the novel-view model "
                           "needs the whole product. Give that displace out_of_frame: refuse with "
                           "max_outside_share: 0, or rotate first"))
        if a.op == "displace":
            s = a.params.settings
            may_clip = may_clip or s.out_of_frame == "clip" or s.max_outside_share > 0
    return out
