"""LoRA commands: `train-lora`, `caption`, `generate`. ``register(app)`` adds them to the CLI.

Heavy libraries (torch, diffusers, peft) load inside the commands so ``--help`` stays instant.
Exit codes as everywhere (cli/common.py): 2 bad options or settings, 3 a model cannot load,
4 bad input (dataset, masks, LoRA files); 1 when training diverged.
"""

from __future__ import annotations

from pathlib import Path
import inspect
from enum import Enum
from typing import Any, List, Optional

import typer

from cli.common import (EXIT_CONFIG, EXIT_INPUT, ConfigOption, Sampler, console, fail, load_settings_or_exit,
                        model_errors)

COMMANDS = ("train-lora", "caption", "generate")


def register(app: typer.Typer) -> None:
    """Add `caption` and `generate` to ``app``. Idempotent: a second call adds nothing. `train-lora`
    is built on first use (:func:`train_lora_command`; its flags come from TrainConfig, which loads
    pydantic): cli/main.py adds it to the group as a :class:`~cli.common.LazyCommand`."""
    have = {c.name for c in app.registered_commands}
    for name, fn in (("caption", caption_cmd), ("generate", generate_cmd)):
        if name not in have:
            app.command(name)(fn)


# ------------------------------------------------------------------------------------------------
# train-lora


def _progress_observer():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from lora.train import TrainObserver

    class RichObserver(TrainObserver):
        def __init__(self) -> None:
            self.progress: Progress | None = None
            self.task = None
            self.ema: float | None = None

        def begin(self, total_steps: int, start_step: int, info: dict[str, Any]) -> None:
            console.print(f"training on {info['images']} image(s), {info['samples_per_epoch']} samples/epoch, "
                          f"{info['steps_per_epoch']} steps/epoch, {info['epochs']} epoch(s), {total_steps} steps; "
                          f"{info['trainable_parameters']:,} LoRA parameters on {info['device']} "
                          f"(mixed precision: {info['mixed_precision']})")
            self.progress = Progress(
                TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, loss="-", lr="-")

        def step(self, step: int, loss: float, lr: float) -> None:
            # A smoothed loss: single diffusion steps jump with the random timestep.
            self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
            if self.progress is not None:
                self.progress.update(self.task, completed=step, loss=f"{self.ema:.4f}", lr=f"{lr:.2e}")

        def message(self, text: str) -> None:
            (self.progress.console if self.progress else console).print(text)

        def end(self) -> None:
            if self.progress is not None:
                self.progress.stop()

    return RichObserver()


# train-lora's flags are generated from lora.config.TrainConfig's fields (one declaration: name,
# type, choices, help); a flag given overrides the --train-config file. Flag spellings that differ
# from the field name are kept from before the training file existed.
_FLAG_NAMES: dict[str, tuple[str, ...]] = {
    "learning_rate": ("--lr", "--learning-rate"),
    "caption_extension": ("--caption-ext", "--caption-extension"),
    "output_dir": ("--out", "-o", "--output-dir"),
}
# Not flags: the dataset is the argument, max_pixels comes from the settings, export_kohya is --format.
_NOT_FLAGS = ("dataset", "max_pixels", "export_kohya")


class ExportFormat(str, Enum):
    diffusers = "diffusers"
    kohya = "kohya"


def _field_flags() -> dict[str, tuple[str, Any, Any]]:
    """TrainConfig field -> (its main flag, its annotation for Typer, its typer.Option), every
    default None so that an option not given leaves the file's value (or the model's default)."""
    import typing

    from lora.config import TrainConfig

    out = {}
    for name, f in TrainConfig.model_fields.items():
        if name in _NOT_FLAGS:
            continue
        tp = f.annotation
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is not typing.Literal and len(args) == 1 and type(None) in typing.get_args(tp):
            tp = args[0]  # X | None -> X
        if typing.get_origin(tp) is typing.Literal:
            tp = Enum(f"{name.title().replace('_', '')}Choice", {v: v for v in typing.get_args(tp)}, type=str)
        flags = _FLAG_NAMES.get(name, (f"--{name.replace('_', '-')}",))
        decl = (f"{flags[0]}/--no-{flags[0][2:]}",) if tp is bool else flags
        default = "" if f.is_required() or f.default is None or name == "name" else f" (default: {f.default})"
        out[name] = (flags[0], Optional[tp], typer.Option(None, *decl, help=(f.description or "") + default,
                                                          show_default=False))
    return out


def _train_lora(dataset: Optional[Path], train_config: Optional[Path], class_name: Optional[str],
                fmt: Optional[ExportFormat], use_8bit_adam: bool, config: Optional[Path], **fields: Any) -> None:
    """Train a style LoRA for SD inpainting/enhance on a folder of product photos.

    Options come from --train-config FILE (a YAML mapping of the option names with '_', e.g.
    learning_rate: 1e-4; relative paths against the file's folder) and the flags, which override
    the file. Writes OUT/NAME.safetensors (diffusers LoRA), OUT/NAME.kohya.safetensors with --format
    kohya, OUT/NAME.json (manifest), OUT/checkpoints/, OUT/validation/ and OUT/train-log.jsonl,
    then prints the rules snippet that uses the LoRA. Exit 2 bad options or training file, 3
    model, 4 bad dataset."""
    from lora.config import TrainConfigError, load_train_config
    from pipeline.settings import SettingsError

    overrides = {k: (v.value if isinstance(v, Enum) else v) for k, v in fields.items()}
    overrides["dataset"] = dataset
    if fmt is not None:
        overrides["export_kohya"] = fmt is ExportFormat.kohya
    if use_8bit_adam:
        overrides["optimizer"] = "adamw8bit"
    s = load_settings_or_exit(config)
    flag_names = {k: v[0] for k, v in _field_flags().items()} | {"dataset": "DATASET", "export_kohya": "--format"}
    try:
        cfg = load_train_config(train_config, overrides, loras_root=s.resolve_path("loras"),
                                max_pixels=s.limits.max_pixels, flag_names=flag_names)
    except SettingsError as e:
        raise fail(str(e), EXIT_CONFIG) from None
    except TrainConfigError as e:
        msg = "; ".join(f"{flag_names.get(k.split('.')[0], k)}: {v}" if k else v for k, v in e.problems)
        raise fail(f"bad training options: {msg}", EXIT_CONFIG) from None
    if cfg.mask_dir is not None and not cfg.mask_dir.is_dir():
        raise fail(f"mask_dir {cfg.mask_dir}: not a folder", EXIT_INPUT)
    tag, auto_mask = cfg.tag, cfg.auto_mask
    from lora.dataset import DatasetError
    from lora.export import rule_snippet
    from lora.train import MaskedLossError, TrainDiverged, TrainError, Trainer
    from pipeline.models.registry import ModelRegistry

    reg = ModelRegistry(s)
    obs = _progress_observer()
    with model_errors():
        try:
            result = Trainer(cfg, reg, s, obs).train()
        except (DatasetError, MaskedLossError) as e:
            raise fail(str(e), EXIT_INPUT) from None
        except TrainDiverged as e:
            raise fail(str(e), 1) from None
        except TrainError as e:
            raise fail(str(e), EXIT_CONFIG) from None
    man = result.manifest
    console.print(f"[green]trained[/] {man['steps']} steps"
                  + (f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else "")
                  + (f", loss {man['loss']['first']:.4f} -> {man['loss']['last_mean']:.4f} (mean of last steps)"
                     if man["loss"]["first"] is not None else ""))
    console.print(f"  LoRA      {result.lora_file}")
    if result.kohya_file:
        console.print(f"  kohya     {result.kohya_file}  (A1111 / ComfyUI)")
    console.print(f"  manifest  {result.manifest_file}")
    if result.validation_images:
        console.print(f"  validation images in {cfg.output_dir / 'validation'}")
    snippet_class = class_name or auto_mask or (s.detect.classes[0].name if s.detect.classes else "product")
    console.print("\nuse it in the rules file (rules.yaml):\n")
    typer.echo(rule_snippet(result.lora_file, snippet_class, tag,
                            class_is_guess=class_name is None and auto_mask is None))
    console.print(f"try it: product-studio generate --class {snippet_class} --lora {result.lora_file} -n 4")


def _train_lora_signature() -> inspect.Signature:
    P = inspect.Parameter
    params = [
        P("dataset", P.POSITIONAL_OR_KEYWORD, annotation=Optional[Path], default=typer.Argument(
            None, help="folder of images + same-stem .txt captions (N_name sub-folders = N repeats), or with a "
                       "metadata.jsonl (default: dataset: in --train-config)", show_default=False)),
        P("train_config", P.POSITIONAL_OR_KEYWORD, annotation=Optional[Path], default=typer.Option(
            None, "--train-config", "-t", help="training file (YAML): any option below by its field name; "
                                               "flags override it")),
        P("class_name", P.POSITIONAL_OR_KEYWORD, annotation=Optional[str], default=typer.Option(
            None, "--class", help="product class for the printed rule snippet (default: the --auto-mask class)")),
        P("fmt", P.POSITIONAL_OR_KEYWORD, annotation=Optional[ExportFormat], default=typer.Option(
            None, "--format", help="kohya also writes NAME.kohya.safetensors (A1111 / ComfyUI) (default: diffusers)")),
        P("use_8bit_adam", P.POSITIONAL_OR_KEYWORD, annotation=bool, default=typer.Option(
            False, "--use-8bit-adam", help="same as --optimizer adamw8bit")),
    ]
    params += [P(name, P.POSITIONAL_OR_KEYWORD, annotation=tp, default=opt)
               for name, (_, tp, opt) in _field_flags().items()]
    params.append(P("config", P.POSITIONAL_OR_KEYWORD, annotation=Optional[Path], default=ConfigOption))
    return inspect.Signature(params)


def train_lora_cmd(**kwargs: Any) -> None:
    _train_lora(**kwargs)


train_lora_cmd.__doc__ = _train_lora.__doc__
TRAIN_LORA_HELP = (_train_lora.__doc__ or "").strip().split("\n")[0]


def train_lora_command() -> Any:
    """The click command of `train-lora`, its options generated from TrainConfig's fields."""
    train_lora_cmd.__signature__ = _train_lora_signature()  # type: ignore[attr-defined]
    one = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    one.command("train-lora")(train_lora_cmd)
    return typer.main.get_command(one)


# ------------------------------------------------------------------------------------------------
# caption


def caption_cmd(
    dataset: Path = typer.Argument(..., help="dataset folder (images at the top and in N_name sub-folders)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing caption files"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="BLIP conditional prefix, e.g. 'a product photo of'"),
    caption_ext: str = typer.Option(".txt", "--caption-ext", help="caption file extension"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, max=256),
    max_tokens: int = typer.Option(40, "--max-tokens", min=1, max=512, help="longest caption, in tokens"),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Write a caption file beside each dataset image with the captioner (BLIP), skipping images
    that have one unless --overwrite. The activation tag is not written (train-lora adds it).

    Exit 0 when every image was captioned or skipped, 4 if an image could not be read."""
    import re

    from lora.caption import caption_dataset
    from lora.dataset import DatasetError
    from pipeline.models.registry import ModelRegistry

    if not re.fullmatch(r"\.\w+", caption_ext):
        raise fail(f"--caption-ext {caption_ext!r} is not a file extension (e.g. .txt)", EXIT_CONFIG)
    s = load_settings_or_exit(config)
    reg = ModelRegistry(s)
    with model_errors(), console.status("captioning...") as st:
        done = [0]

        def on_item(path: Path, status: str) -> None:
            done[0] += 1
            st.update(f"captioning... {done[0]} {path.name}: {status}")

        try:
            report = caption_dataset(reg, dataset, overwrite=overwrite, caption_extension=caption_ext, prompt=prompt,
                                     batch_size=batch_size, max_pixels=s.limits.max_pixels,
                                     max_new_tokens=max_tokens, on_item=on_item)
        except DatasetError as e:
            raise fail(str(e), EXIT_INPUT) from None
    for path, text in report.written:
        console.print(f"[green]wrote[/]   {path.relative_to(dataset) if path.is_relative_to(dataset) else path}: {text}")
    console.print(f"{len(report.written)} written, {len(report.skipped)} skipped (caption exists"
                  f"{'; --overwrite replaces them' if report.skipped else ''}), {len(report.failed)} failed")
    if report.empty:
        console.print(f"[yellow]warning[/]: {len(report.empty)} caption(s) came back empty; edit them by hand")
    for path, reason in report.failed:
        console.print(f"[red]failed[/]  {path}: {reason}", soft_wrap=True)
    if report.failed:
        raise typer.Exit(EXIT_INPUT)


# ------------------------------------------------------------------------------------------------
# generate


def generate_cmd(
    class_name: str = typer.Option(..., "--class", help="product class (fills {label} in the prompt template)"),
    lora: Optional[List[str]] = typer.Option(None, "--lora", help="LoRA FILE[:WEIGHT] (repeatable)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="prompt (default: settings enhance.prompt_template; "
                                         "{tag} and {label} are filled in)"),
    tag: Optional[str] = typer.Option(None, "--tag", help="activation tag (default: from the LoRA's manifest)"),
    n: int = typer.Option(1, "-n", "--count", min=1, max=1000, help="number of images"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the first image; image k uses SEED+k "
                                       "(default: settings enhance.seed)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: <outbox>/generate)"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, max=500, help="default: settings enhance.steps"),
    guidance: Optional[float] = typer.Option(None, "--guidance", min=0.0, max=50.0,
                                             help="default: settings enhance.guidance"),
    width: Optional[int] = typer.Option(None, "--width", help="default: settings enhance.resolution (auto: the base model's native size)"),
    height: Optional[int] = typer.Option(None, "--height", help="default: settings enhance.resolution (auto: the base model's native size)"),
    negative: Optional[str] = typer.Option(None, "--negative", help="negative prompt (default: settings)"),
    sampler: Optional[Sampler] = typer.Option(None, "--sampler", help="few-step LoRA samplers (default: settings "
                                              "enhance.sampler)"),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Product photoshoot visuals from text with the base model and LoRAs: writes CLASS-SEED.png and
    CLASS-SEED.json (prompt, seed, models, LoRA hashes) per image; the same seed gives the same image.

    Exit 2 bad options, 3 model cannot load, 4 a LoRA file is missing or unusable."""
    from lora.apply import LoraError, parse_lora
    from lora.generate import generate_images
    from pipeline.models.registry import ModelRegistry
    from pipeline.settings import ProductClass

    try:
        ProductClass(name=class_name)
    except Exception:  # noqa: BLE001 - pydantic's message is long; ours names the rule
        raise fail(f"--class {class_name!r}: letters, digits, spaces, '-' and '_' only", EXIT_CONFIG) from None
    specs = []
    for text in lora or []:
        try:
            specs.append(parse_lora(text))
        except LoraError as e:
            raise fail(f"--lora: {e}", EXIT_INPUT) from None
    s = load_settings_or_exit(config)
    out_dir = out or s.resolve_path(s.paths.outbox) / "generate"
    reg = ModelRegistry(s)
    with model_errors(), console.status(f"generating {n} image(s)..."):
        try:
            results = generate_images(reg, s, class_name, out_dir=out_dir, loras=specs, prompt=prompt, tag=tag, n=n,
                                      seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                                      negative_prompt=negative, sampler=sampler.value if sampler else None)
        except LoraError as e:
            raise fail(str(e), EXIT_INPUT) from None
        except ValueError as e:
            raise fail(str(e), EXIT_CONFIG) from None
    if results:
        console.print(f"prompt: {results[0].record['prompt']}", soft_wrap=True)
    for r in results:
        console.print(f"[green]generated[/] {r.image_path}  (seed {r.record['seed']})")
