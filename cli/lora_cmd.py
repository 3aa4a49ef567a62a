"""LoRA commands: `train-lora`, `caption`, `generate`. ``register(app)`` adds them to the CLI.

Heavy libraries (torch, diffusers, peft) load inside the commands so ``--help`` stays instant.
Exit codes as everywhere (cli/common.py): 2 bad options or settings, 3 a model cannot load,
4 bad input (dataset, masks, LoRA files); 1 when training diverged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from cli.common import EXIT_CONFIG, EXIT_INPUT, ConfigOption, console, fail, load_settings_or_exit, model_errors

COMMANDS = ("train-lora", "caption", "generate")


def register(app: typer.Typer) -> None:
    """Add the LoRA commands to ``app``. Idempotent: a second call adds nothing."""
    have = {c.name for c in app.registered_commands}
    for name, fn in (("train-lora", train_lora_cmd), ("caption", caption_cmd), ("generate", generate_cmd)):
        if name not in have:
            app.command(name)(fn)


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^\w.\-]+", "_", text.strip()).strip("_.") or "lora"


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


def train_lora_cmd(
    dataset: Path = typer.Argument(..., help="folder of images + same-stem .txt captions (N_name sub-folders = "
                                   "N repeats), or with a metadata.jsonl"),
    tag: str = typer.Option(..., "--tag", help="activation tag prepended to every caption, e.g. ppzocketv2"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: loras/NAME under the "
                                       "settings root)"),
    name: Optional[str] = typer.Option(None, "--name", help="LoRA file stem (default: the tag)"),
    class_name: Optional[str] = typer.Option(None, "--class", help="product class for the printed rule snippet "
                                             "(default: the --auto-mask class)"),
    # data
    resolution: int = typer.Option(512, "--resolution", help="training size (square side; bucket area side)"),
    crop: str = typer.Option("center", "--crop", help="center | random"),
    flip: bool = typer.Option(False, "--flip/--no-flip", help="random horizontal flips"),
    buckets: bool = typer.Option(False, "--buckets/--no-buckets", help="aspect-ratio buckets"),
    bucket_step: int = typer.Option(64, "--bucket-step", help="bucket sides are multiples of this"),
    min_bucket: int = typer.Option(256, "--min-bucket", help="smallest bucket side"),
    max_bucket: int = typer.Option(1024, "--max-bucket", help="largest bucket side"),
    repeats: int = typer.Option(1, "--repeats", help="repeats for images outside N_name folders"),
    missing_caption: str = typer.Option("error", "--missing-caption", help="image without caption: error | tag "
                                        "(train it with the tag alone)"),
    caption_ext: str = typer.Option(".txt", "--caption-ext", help="caption file extension"),
    shuffle_caption: bool = typer.Option(False, "--shuffle-caption", help="shuffle comma-separated caption parts"),
    keep_tokens: int = typer.Option(1, "--keep-tokens", help="leading caption parts kept in place when shuffling"),
    caption_dropout: float = typer.Option(0.0, "--caption-dropout", help="chance of training a step uncaptioned"),
    cache_latents: bool = typer.Option(False, "--cache-latents", help="encode images once (centre crop, no flip)"),
    # network
    rank: int = typer.Option(16, "--rank", help="LoRA rank (kohya network_dim)"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="LoRA alpha (network_alpha; default = rank)"),
    dropout: float = typer.Option(0.0, "--dropout", help="LoRA dropout"),
    targets: str = typer.Option("transformer", "--targets", help="attn | transformer (kohya default) | all "
                                "(+ ResNet convs, LoCon)"),
    train_text_encoder: bool = typer.Option(False, "--train-text-encoder", help="also train a text-encoder LoRA"),
    # optimisation
    lr: float = typer.Option(1e-4, "--lr", "--learning-rate", help="learning rate"),
    text_encoder_lr: Optional[float] = typer.Option(None, "--text-encoder-lr", help="default: --lr"),
    lr_scheduler: str = typer.Option("constant", "--lr-scheduler", help="constant | constant_with_warmup | linear "
                                     "| cosine | cosine_with_restarts | polynomial"),
    lr_warmup_steps: int = typer.Option(0, "--lr-warmup-steps"),
    lr_cycles: int = typer.Option(1, "--lr-cycles", help="cosine_with_restarts cycles"),
    epochs: int = typer.Option(10, "--epochs"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="optimizer steps; overrides --epochs"),
    batch_size: int = typer.Option(1, "--batch-size"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="gradient accumulation steps"),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw | adamw8bit (needs bitsandbytes, CUDA)"),
    use_8bit_adam: bool = typer.Option(False, "--use-8bit-adam", help="same as --optimizer adamw8bit"),
    weight_decay: float = typer.Option(1e-2, "--weight-decay"),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="gradient clipping; 0 = off"),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help="auto (fp16 on CUDA) | no | fp16 | bf16"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="less memory, slower"),
    seed: int = typer.Option(0, "--seed"),
    noise_offset: float = typer.Option(0.0, "--noise-offset", help="e.g. 0.05 (darker darks, brighter brights)"),
    snr_gamma: Optional[float] = typer.Option(None, "--snr-gamma", help="min-SNR loss weighting, e.g. 5.0"),
    min_timestep: int = typer.Option(0, "--min-timestep"),
    max_timestep: int = typer.Option(1000, "--max-timestep"),
    # masked loss
    mask_dir: Optional[Path] = typer.Option(None, "--mask-dir", help="product masks (white = product), same stems "
                                            "as the images"),
    auto_mask: Optional[str] = typer.Option(None, "--auto-mask", help="detect this class for the masks "
                                            "(SAM + CLIP); masks saved under OUT/auto-masks"),
    background_weight: float = typer.Option(0.0, "--background-weight", help="loss weight of non-product pixels"),
    # checkpoints
    save_every: int = typer.Option(0, "--save-every", help="checkpoint every N steps (0: at the end only)"),
    keep_checkpoints: int = typer.Option(3, "--keep-checkpoints", help="keep the last K checkpoints"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in OUT"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start over in an OUT that holds a run"),
    # validation
    validation_prompt: Optional[str] = typer.Option(None, "--validation-prompt", help="render it every epoch "
                                                    "('{tag}' = the tag) into OUT/validation"),
    validation_images: int = typer.Option(2, "--validation-images"),
    validation_steps: int = typer.Option(20, "--validation-steps", help="sampling steps per validation image"),
    validation_every: int = typer.Option(1, "--validation-every", help="epochs between validations"),
    # export
    fmt: str = typer.Option("diffusers", "--format", help="diffusers | kohya (also NAME.kohya.safetensors for "
                            "A1111 / ComfyUI)"),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Train a style LoRA for SD inpainting/enhance on a folder of product photos.

    Writes OUT/NAME.safetensors (diffusers LoRA), OUT/NAME.kohya.safetensors with --format kohya,
    OUT/NAME.json (manifest), OUT/checkpoints/, OUT/validation/ and OUT/train-log.jsonl, then
    prints the rules snippet that uses the LoRA. Exit 2 bad options, 3 model, 4 bad dataset."""
    from lora.config import TrainConfig, TrainConfigError

    if fmt not in ("diffusers", "kohya"):
        raise fail(f"--format must be diffusers or kohya, not {fmt!r}", EXIT_CONFIG)
    if use_8bit_adam:
        optimizer = "adamw8bit"
    s = load_settings_or_exit(config)
    stem = name or _slug(tag)
    out_dir = out or s.resolve_path("loras") / stem
    try:
        cfg = TrainConfig.build(
            dataset=dataset, output_dir=out_dir, name=stem, tag=tag, resolution=resolution, crop=crop, flip=flip,
            buckets=buckets, bucket_step=bucket_step, min_bucket=min_bucket, max_bucket=max_bucket, repeats=repeats,
            missing_caption=missing_caption, caption_extension=caption_ext, shuffle_caption=shuffle_caption,
            keep_tokens=keep_tokens, caption_dropout=caption_dropout, cache_latents=cache_latents, rank=rank,
            alpha=alpha, dropout=dropout, targets=targets, train_text_encoder=train_text_encoder,
            learning_rate=lr, text_encoder_lr=text_encoder_lr, lr_scheduler=lr_scheduler,
            lr_warmup_steps=lr_warmup_steps, lr_cycles=lr_cycles, epochs=epochs, max_steps=max_steps,
            batch_size=batch_size, grad_accum=grad_accum, optimizer=optimizer, weight_decay=weight_decay,
            max_grad_norm=max_grad_norm, mixed_precision=mixed_precision,
            gradient_checkpointing=gradient_checkpointing, seed=seed, noise_offset=noise_offset,
            snr_gamma=snr_gamma, min_timestep=min_timestep, max_timestep=max_timestep, mask_dir=mask_dir,
            auto_mask=auto_mask, background_weight=background_weight, save_every=save_every,
            keep_checkpoints=keep_checkpoints, resume=resume, overwrite=overwrite,
            validation_prompt=validation_prompt, validation_images=validation_images,
            validation_steps=validation_steps, validation_every=validation_every, export_kohya=fmt == "kohya",
            max_pixels=s.limits.max_pixels)
    except TrainConfigError as e:
        opts = {"learning_rate": "lr", "export_kohya": "format", "caption_extension": "caption-ext"}
        msg = "; ".join(f"--{opts.get(k, k).replace('_', '-')}: {v}" if k else v for k, v in e.problems)
        raise fail(f"bad training options: {msg}", EXIT_CONFIG) from None
    if mask_dir is not None and not mask_dir.is_dir():
        raise fail(f"--mask-dir {mask_dir}: not a folder", EXIT_INPUT)

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
    width: Optional[int] = typer.Option(None, "--width", help="default: settings enhance.resolution"),
    height: Optional[int] = typer.Option(None, "--height", help="default: settings enhance.resolution"),
    negative: Optional[str] = typer.Option(None, "--negative", help="negative prompt (default: settings)"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="default | lcm | tcd | hyper (few-step LoRA "
                                          "samplers; default: settings enhance.sampler)"),
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
                                      negative_prompt=negative, sampler=sampler)
        except LoraError as e:
            raise fail(str(e), EXIT_INPUT) from None
        except ValueError as e:
            raise fail(str(e), EXIT_CONFIG) from None
    if results:
        console.print(f"prompt: {results[0].record['prompt']}", soft_wrap=True)
    for r in results:
        console.print(f"[green]generated[/] {r.image_path}  (seed {r.record['seed']})")
