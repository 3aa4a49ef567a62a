"""Background fill ("inpainting") of a masked region, shared by the edits.

Three backends:

* ``"lama"``: the registry's ``inpaint_fill`` role, LaMa (large-mask inpainting with Fourier
  convolutions, Apache-2.0) as the published TorchScript ``big-lama.pt``. It fills from the
  surrounding texture with one forward pass and no prompt, so it does not paint new objects into
  the hole. It runs on a crop around the hole (the crop planner the SD fill uses) at the photo's
  own scale (crops longer than ``lama_resolution`` are scaled down), padded to a multiple of 8
  (the network downsamples three times) by mirroring and cropped back. Its contract, as IOPaint's
  wrapper calls it: ``model(image, mask)`` with image float32 ``Bx3xHxW`` RGB in [0, 1] and mask
  float32 ``Bx1xHxW`` in {0, 1} (1 = fill), returning ``Bx3xHxW`` RGB in [0, 1].
* ``"sd"``: the registry's ``inpaint`` role (a diffusers ``StableDiffusionInpaintPipeline``) run
  on a crop around the hole (mask box + context margin), resized so its long side equals
  ``resolution`` (``auto``: the inpaint model's native size, 512 for SD 1.5, 1024 for SDXL) with
  both sides multiples of 8 and the aspect ratio kept (the crop is widened rather than the
  content stretched). Seeded with a CPU ``torch.Generator`` so a seed gives the
  same noise on every device. Removal defaults (empty prompt, guidance ~2, strength 1.0, a mask
  dilated by ~20 px) come from the callers' settings.
* ``"classical"``: OpenCV's ``cv2.inpaint``, no weights; also the callers' fallback. Navier-Stokes
  (``"ns"``) by default: on a flat backdrop it fills exactly flat, while Telea's normalised
  gradient term drifts by several levels (up to 8 on a 200-grey backdrop with a 70 px hole).

:func:`fill_in_order` tries backends in a fallback order (``fill: [lama, sd, classical]``) with an
optional re-check (e.g. CLIP: "does the hole still show the product?"): the first result that
passes wins and its record says which backend filled and why each other one was not used.

Whatever the backend, the result is pasted back **only inside the dilated mask**: every pixel
outside it is bit-identical to the input. An optional inner feather blends the generated pixels
into the original ones over the outer band of the dilated mask (never over the undilated mask,
which is always fully replaced).

Images are PIL ``"RGB"`` (uint8, R, G, B); masks are HxW ``bool`` numpy arrays at full resolution.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from PIL import Image

from pipeline.io.composite import bbox, dilate, inner_feather_alpha, paste
from pipeline.settings import FILL_BACKENDS, FillSettings
from pipeline.models.registry import ModelLoadError
from pipeline.models.samplers import plan_sampler, sampling

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.models.registry import ModelRegistry

BACKENDS = FILL_BACKENDS
# The model role each backend loads (classical needs none).
BACKEND_ROLES: dict[str, str] = {"lama": "inpaint_fill", "sd": "inpaint"}
# LaMa downsamples three times by 2: its input sides must be multiples of 8.
LAMA_MULTIPLE = 8

__all__ = ["BACKENDS", "BACKEND_ROLES", "CropBox", "FillOutcome", "fill", "fill_in_order", "lama_inpaint",
           "plan_crop", "sd_inpaint"]


@dataclass(frozen=True)
class CropBox:
    """A region of the full image and the size the model sees it at.

    ``x0, y0, x1, y1``: integer pixels in the full image, x1/y1 exclusive.
    ``work_w, work_h``: the model input size (multiples of 8; the long side is the resolution).
    """

    x0: int
    y0: int
    x1: int
    y1: int
    work_w: int
    work_h: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the crop in full-image pixels."""
        return (self.x1 - self.x0, self.y1 - self.y0)

    @property
    def work_size(self) -> tuple[int, int]:
        return (self.work_w, self.work_h)

    def crop_array(self, arr: np.ndarray) -> np.ndarray:
        """The crop of an HxW or HxWxC array (a view)."""
        return arr[self.y0 : self.y1, self.x0 : self.x1]

    def to_work(self, image: Image.Image) -> Image.Image:
        """Full image -> the crop resized to the work size (Lanczos)."""
        return image.crop(self.box).resize(self.work_size, Image.Resampling.LANCZOS)

    def mask_to_work(self, mask: np.ndarray) -> Image.Image:
        """Full-resolution HxW bool mask -> mode ``"L"`` work-size mask (0 / 255).

        Conservative: a work pixel is masked when any full-resolution pixel under it is, so the
        model regenerates at least everything that will be pasted back.
        """
        import cv2

        sub = self.crop_array(np.asarray(mask)).astype(np.float32)
        small = cv2.resize(sub, self.work_size, interpolation=cv2.INTER_AREA)
        return Image.fromarray(((small > 0) * 255).astype(np.uint8), "L")

    def from_work(self, image: Image.Image) -> Image.Image:
        """A work-size image -> resized back to the crop's full-resolution size (Lanczos)."""
        return image.resize(self.size, Image.Resampling.LANCZOS)

    def to_record(self) -> dict[str, Any]:
        return {"box": list(self.box), "work_size": list(self.work_size)}


def _snap_up(v: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(v / multiple - 1e-9)) * multiple)


def _grow_axis(lo: int, hi: int, target: int, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) to length ``target`` around its centre, shifted to stay inside [0, limit)."""
    target = min(max(target, hi - lo), limit)
    extra = target - (hi - lo)
    lo -= extra // 2
    hi += extra - extra // 2
    if lo < 0:
        hi, lo = hi - lo, 0
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    return max(0, lo), min(limit, hi)


def plan_crop(box: Sequence[float], image_size: tuple[int, int], *, margin: float, resolution: int,
              multiple: int = 8, native: bool = False) -> CropBox:
    """Plan the model crop around ``box`` (x0, y0, x1, y1 in pixels of an image of
    ``image_size`` = (width, height)).

    The box grows by ``margin`` x its width/height on each side (context for the model) and is
    clipped to the image. The work size has its long side equal to ``resolution`` (a multiple of
    ``multiple``) and its short side the smallest multiple of ``multiple`` that keeps the aspect
    ratio; the crop's short side is then widened (centred, kept inside the image) to that exact
    ratio, so the content is scaled, never stretched, except when the image itself is too narrow
    (then by less than one ``multiple`` step at work resolution).

    ``native``: for fully convolutional models (LaMa) that take any size. When the context crop's
    long side is at most ``resolution`` it is kept at scale 1 (work size = crop size, not snapped
    to ``multiple``: the caller pads); a longer crop is planned as above.
    """
    if resolution % multiple or resolution < multiple:
        raise ValueError(f"resolution {resolution} must be a positive multiple of {multiple}")
    W, H = image_size
    x0, y0, x1, y1 = box
    bw, bh = max(1.0, x1 - x0), max(1.0, y1 - y0)
    cx0 = max(0, int(math.floor(x0 - margin * bw)))
    cy0 = max(0, int(math.floor(y0 - margin * bh)))
    cx1 = min(W, int(math.ceil(x1 + margin * bw)))
    cy1 = min(H, int(math.ceil(y1 + margin * bh)))
    if cx1 <= cx0 or cy1 <= cy0:
        raise ValueError(f"crop box {tuple(box)} lies outside the {W}x{H} image")
    cw, ch = cx1 - cx0, cy1 - cy0
    if native and max(cw, ch) <= resolution:
        return CropBox(cx0, cy0, cx1, cy1, cw, ch)
    scale = resolution / max(cw, ch)
    if cw >= ch:
        work_w, work_h = resolution, _snap_up(ch * scale, multiple)
        cy0, cy1 = _grow_axis(cy0, cy1, int(round(work_h / scale)), H)
    else:
        work_w, work_h = _snap_up(cw * scale, multiple), resolution
        cx0, cx1 = _grow_axis(cx0, cx1, int(round(work_w / scale)), W)
    return CropBox(cx0, cy0, cx1, cy1, work_w, work_h)


def sd_inpaint(pipe: Any, image: Image.Image, mask: Image.Image, *, seed: int, steps: int, guidance: float,
               strength: float = 1.0, prompt: str = "", negative_prompt: str = "",
               eta: float | None = None) -> Image.Image:
    """One diffusers inpainting call at the image's own size (must be multiples of 8).

    ``image``: PIL RGB; ``mask``: PIL ``"L"`` (255 = regenerate). ``eta``: the scheduler's eta
    (None: not passed). Returns PIL RGB of the same size.
    """
    import torch

    if int(steps * strength) < 1:
        raise ValueError(f"steps={steps} x strength={strength} leaves no denoising step; raise either")
    w, h = image.size
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    out = pipe(prompt=prompt, negative_prompt=negative_prompt or None, image=image, mask_image=mask,
               height=h, width=w, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
               generator=gen, output_type="np", **({} if eta is None else {"eta": eta}))
    arr = np.asarray(out.images[0], dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), "RGB")


def lama_inpaint(model: Any, image: Image.Image, mask: Image.Image, *, device: Any = "cpu",
                 multiple: int = LAMA_MULTIPLE) -> Image.Image:
    """One LaMa forward pass at the image's own size (any size).

    ``model``: a TorchScript (or any) module with LaMa's contract, ``model(image, mask)``: image
    float32 ``1x3xHxW`` RGB in [0, 1], mask float32 ``1x1xHxW`` in {0, 1} (1 = fill), output
    ``1x3xHxW`` RGB in [0, 1]. ``image``: PIL RGB; ``mask``: PIL ``"L"`` (> 127 = fill).
    The inputs are padded on the bottom/right to multiples of ``multiple`` by mirroring (as
    IOPaint pads) and the output is cropped back. Returns PIL RGB of the input's size.
    IOPaint hands the mask over as an integer {0, 1} tensor; the network only multiplies and
    concatenates it with the float image, so float32 {0, 1} is the same input without a promotion.
    """
    import torch

    w, h = image.size
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    hole = (np.asarray(mask.convert("L")) > 127).astype(np.float32)
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
        hole = np.pad(hole, ((0, ph), (0, pw)), mode="symmetric")
    t_img = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None].to(device)
    t_mask = torch.from_numpy(np.ascontiguousarray(hole))[None, None].to(device)
    with torch.inference_mode():
        out = model(t_img, t_mask)
    want = (1, 3, h + ph, w + pw)
    if tuple(out.shape) != want:
        raise RuntimeError(f"the LaMa model returned shape {tuple(out.shape)} for input {want}: not LaMa's contract "
                           "(image 1x3xHxW and mask 1x1xHxW in, 1x3xHxW out)")
    arr = out[0, :, :h, :w].float().clamp(0.0, 1.0).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.rint(arr * 255.0).astype(np.uint8), "RGB")


CLASSICAL_METHODS = ("ns", "telea")


def _classical(rgb: np.ndarray, hole: np.ndarray, radius: int, method: str) -> np.ndarray:
    """cv2.inpaint restricted to the hole's box plus the pixels it can look at."""
    import cv2

    if method not in CLASSICAL_METHODS:
        raise ValueError(f"unknown classical inpaint method {method!r} (one of: {', '.join(CLASSICAL_METHODS)})")
    flag = cv2.INPAINT_NS if method == "ns" else cv2.INPAINT_TELEA

    box = bbox(hole, pad=radius + 2)
    x0, y0, x1, y1 = box
    sub = np.ascontiguousarray(rgb[y0:y1, x0:x1])
    m = np.ascontiguousarray(hole[y0:y1, x0:x1], dtype=np.uint8) * 255
    # Both methods treat each channel alike, so RGB order needs no conversion.
    filled = cv2.inpaint(sub, m, float(radius), flag)
    out = rgb.copy()
    out[y0:y1, x0:x1] = filled
    return out


def fill(image: Image.Image, mask: np.ndarray, settings: FillSettings, registry: "ModelRegistry | None" = None, *,
         seed: int = 0, backend: str | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """Fill ``dilate(mask, settings.mask_dilation)`` with plausible background, by one backend.

    ``image``: PIL ``"RGB"`` (callers convert RGBA etc. first). ``mask``: HxW bool, the region
    to replace (e.g. the object to remove). ``settings``: the fill (:class:`FillSettings`).
    ``backend``: the backend to run; None: ``settings.backend``, which must then be one name (an
    order is :func:`fill_in_order`'s). ``"lama"`` (needs ``registry``; crop at the photo's scale
    up to ``lama_resolution`` long side), ``"sd"`` (needs ``registry``; ``seed``, ``sampler``:
    ``default`` runs ``steps`` and ``guidance``, ``lcm``/``tcd``/``hyper`` their own, see
    :mod:`pipeline.models.samplers`) or ``"classical"`` (``classical_method`` ``"ns"`` or ``"telea"``,
    neighbourhood ``classical_radius`` px). ``blend``: inner feather in pixels, clamped to
    ``mask_dilation``, over which generated pixels fade into the original ones at the edge of the
    dilated mask.

    Returns ``(filled PIL RGB image, record)``. Pixels outside ``dilate(mask, mask_dilation)`` are
    bit-identical to ``image``; pixels in ``mask`` come wholly from the backend. The record holds
    backend, seed and sampler settings (sd), crop and scale (sd, lama), mask sizes and the time taken.
    """
    if backend is None:
        if not isinstance(settings.backend, str):
            raise ValueError(f"fill runs one backend; {settings.backend} is an order (use fill_in_order)")
        backend = settings.backend
    s = settings
    dilation, crop_margin = s.mask_dilation, s.crop_margin
    if backend not in BACKENDS:
        raise ValueError(f"unknown fill backend {backend!r} (one of: {', '.join(BACKENDS)})")
    if image.mode != "RGB":
        raise ValueError(f"fill expects an RGB image, got mode {image.mode}")
    W, H = image.size
    m = np.asarray(mask)
    if m.shape != (H, W):
        raise ValueError(f"mask shape {m.shape} does not match the image ({H}, {W})")
    m = m.astype(bool, copy=False)
    t0 = time.perf_counter()
    hole = dilate(m, dilation)
    rec: dict[str, Any] = {"backend": backend, "dilation": int(dilation), "mask_pixels": int(m.sum()),
                           "filled_pixels": int(hole.sum())}
    if not hole.any():
        rec["seconds"] = round(time.perf_counter() - t0, 4)
        return image.copy(), rec
    rgb = np.asarray(image)
    if backend == "classical":
        generated = _classical(rgb, hole, s.classical_radius, s.classical_method)
        rec.update(method=s.classical_method, radius=int(s.classical_radius))
    elif backend == "lama":
        if registry is None:
            raise ValueError("the 'lama' fill backend needs a model registry (role 'inpaint_fill')")
        crop = plan_crop(bbox(hole), (W, H), margin=crop_margin, resolution=s.lama_resolution, native=True)
        work = lama_inpaint(registry.get("inpaint_fill"), crop.to_work(image), crop.mask_to_work(hole),
                            device=registry.runtime.device)
        generated = rgb.copy()
        crop.crop_array(generated)[...] = np.asarray(crop.from_work(work))
        cw, ch = crop.size
        rec.update(lama_resolution=int(s.lama_resolution), crop_margin=float(crop_margin), crop=crop.to_record(),
                   scale=1.0 if crop.work_size == crop.size else round(crop.work_w / cw, 4),
                   padded_size=[crop.work_w + (-crop.work_w) % LAMA_MULTIPLE,
                                crop.work_h + (-crop.work_h) % LAMA_MULTIPLE])
    else:
        if registry is None:
            raise ValueError("the 'sd' fill backend needs a model registry (role 'inpaint')")
        # auto: the inpaint model's native size (SD 1.5 512, SDXL 1024), read from its files.
        resolution = registry.work_resolution(s.resolution)
        crop = plan_crop(bbox(hole), (W, H), margin=crop_margin, resolution=resolution)
        # The inpaint role's UNet is shared with enhance, which switches LoRA adapters on it for
        # one generation: its lock keeps this fill from ever running with them on.
        plan = plan_sampler(s.sampler, s.steps, s.guidance, registry.settings.samplers)
        with registry.lock("inpaint"):
            pipe = registry.get("inpaint")
            with sampling(registry, pipe, plan) as srec:
                work = sd_inpaint(pipe, crop.to_work(image), crop.mask_to_work(hole), seed=seed,
                                  steps=plan.steps, guidance=plan.guidance, strength=s.strength, prompt=s.prompt,
                                  negative_prompt=s.negative_prompt, eta=plan.eta)
        generated = rgb.copy()
        crop.crop_array(generated)[...] = np.asarray(crop.from_work(work))
        srec.pop("loras", None)
        rec.update(seed=int(seed), steps=int(plan.steps), guidance=float(plan.guidance), strength=float(s.strength),
                   sampler=srec, prompt=s.prompt, negative_prompt=s.negative_prompt, resolution=resolution,
                   crop_margin=float(crop_margin), crop=crop.to_record())
    blend = max(0, min(int(s.blend), int(dilation)))
    alpha = inner_feather_alpha(hole, blend, core=m)
    out = paste(rgb, generated, alpha)
    rec["blend"] = blend
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    result = Image.fromarray(out, "RGB")
    if "icc_profile" in image.info:
        result.info["icc_profile"] = image.info["icc_profile"]
    return result, rec


# checker(filled image PIL RGB, region mask HxW bool, label) -> score; a score at or above the
# threshold means "the product (or a look-alike) is still there".
Checker = Callable[[Image.Image, np.ndarray, str], float]


@dataclass
class FillOutcome:
    """What :func:`fill_in_order` kept: the filled PIL RGB image, the backend that made it, its
    seed (sd only, else None), the seconds spent filling and checking, and the record."""

    image: Image.Image
    backend: str
    seed: int | None
    fill_seconds: float
    check_seconds: float
    record: dict[str, Any]


def _load_error(backend: str, registry: "ModelRegistry | None") -> Exception | None:
    """The error that keeps ``backend`` from running here (its model role cannot be loaded: a
    ModelLoadError, or ValueError without a registry), or None when it can run."""
    role = BACKEND_ROLES.get(backend)
    if role is None:
        return None
    if registry is None:
        return ValueError(f"fill '{backend}' needs a model registry (role '{role}')")
    try:
        registry.get(role)
    except ModelLoadError as e:
        return e
    return None


def fill_in_order(image: Image.Image, mask: np.ndarray, settings: FillSettings, *, label: str,
                  checker: Checker | None = None, seed: int = 0,
                  registry: "ModelRegistry | None" = None) -> FillOutcome:
    """Fill ``mask`` (HxW bool) trying the backends of ``settings.backend`` in order; the first
    result that passes the check wins.

    ``settings``: the fill; its ``backend`` is a name or a list (see
    :func:`pipeline.settings.fill_order`: a single name is followed by ``classical``).
    ``checker``: scores each result on ``mask`` for ``label``; a score at or above
    ``settings.recheck_threshold`` fails the result (it applies to every backend). The caller
    decides whether to check (``settings.recheck``). Without a
    checker the first backend that runs wins. ``sd`` is tried ``settings.retries + 1`` times with seeds
    ``seed, seed+1, ...``; ``lama`` and ``classical`` are deterministic and tried once.
    A backend whose model cannot be loaded is skipped (the reason recorded) when the order was
    given as a list and another backend is left to try or was tried; with a single name the
    :class:`~pipeline.models.registry.ModelLoadError` (or ValueError without a registry) propagates.
    When no result passes, the last one is kept and the record carries a warning.

    The record: ``requested`` (``settings.backend``), ``order``, ``used``, ``fallback`` (something before
    ``used`` was skipped or failed), ``fallback_reason``, ``skipped`` (every other backend of the
    order with why), ``attempts``, ``seeds`` (sd), ``scores`` (one per checked fill; empty without a
    checker), ``still_there``, ``tries`` (one
    entry per fill: backend, seed, fill record, score) and ``warning`` when nothing passed.
    """
    spec, threshold, retries = settings.backend, settings.recheck_threshold, settings.retries
    order = settings.order
    explicit = not isinstance(spec, str)
    t_fill = t_check = 0.0
    tries: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    kept: tuple[Image.Image, str, int | None] | None = None
    still = False
    used: str | None = None
    for i, backend in enumerate(order):
        if used is not None:
            skipped[backend] = (f"not needed: {used} passed the check" if checker is not None
                                else f"not needed: {used} filled (no re-check)")
            continue
        err = _load_error(backend, registry)
        if err is not None:
            if not explicit or (i == len(order) - 1 and not tries):
                raise err
            skipped[backend] = f"model unavailable: {getattr(err, 'reason', err)}"
            continue
        seeds = [seed + k for k in range(retries + 1)] if backend == "sd" else [seed]
        scores: list[float] = []
        for s in seeds:
            t0 = time.perf_counter()
            filled, frec = fill(image, mask, settings, registry, seed=s, backend=backend)
            t_fill += time.perf_counter() - t0
            entry: dict[str, Any] = {"backend": backend, "seed": s if backend == "sd" else None, "fill": frec}
            still = False
            if checker is not None:
                t1 = time.perf_counter()
                score = float(checker(filled, mask, label))
                t_check += time.perf_counter() - t1
                still = score >= threshold
                scores.append(score)
                entry.update(score=round(score, 4), still_there=still)
                detail = getattr(checker, "last_detail", None)
                if detail:
                    entry["detail"] = dict(detail)
            tries.append(entry)
            kept = (filled, backend, entry["seed"])
            if not still:
                used = backend
                break
        else:
            skipped[backend] = (f"still looked like '{label}' after {len(seeds)} attempt(s) "
                                f"(score {max(scores):.2f} >= {threshold})")
    assert kept is not None  # the last backend either ran or raised
    image_out, kept_backend, kept_seed = kept
    if used is None:  # nothing passed: keep the last result, say so
        used = kept_backend
        skipped.pop(used, None)
    before = [b for b in order[: order.index(used)] if b in skipped]
    reason = None
    if before:
        reason = "; ".join(f"{b}: {skipped[b]}" for b in before) + f"; used the {used} fill"
    rec: dict[str, Any] = {
        "requested": spec if isinstance(spec, str) else list(spec), "order": order, "used": used,
        "fallback": bool(before), "fallback_reason": reason, "skipped": skipped, "attempts": len(tries),
        "seeds": [t["seed"] for t in tries if t["backend"] == "sd"],
        "recheck_threshold": threshold if checker is not None else None,
        # only real scores: without a checker the list is empty (reports format every entry)
        "scores": [t["score"] for t in tries if "score" in t], "still_there": bool(still), "tries": tries,
    }
    if still:
        rec["warning"] = f"the old region may still show '{label}' (no attempt cleared the check)"
    return FillOutcome(image_out, used, kept_seed, t_fill, t_check, rec)
