"""Batched JPEG decoding (nvJPEG on a GPU) and the encoders' preprocessing run on whole batches of tensors.

The PIL path (data.images.load_image, then the encoder's own transform, one image at a time in worker
processes) stays the reference: this module only takes the files it can reproduce within rounding and leaves
every other one to it. `sniff_jpeg` reads a file's header and passes only plain 8-bit, 3-component,
sequential (baseline or extended) JPEGs with no EXIF rotation, no Adobe RGB marker and an end-of-image marker:
progressive, CMYK, greyscale, rotated, truncated or odd files go the PIL way, which also gives the reject
reason for the ones that cannot be read at all.
"""
from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

# Decoded pixels held at once by one nvJPEG call; a batch of huge scenes is cut into several calls.
PIXEL_BUDGET = 1 << 27

_SEQUENTIAL_SOF = (0xC0, 0xC1)  # baseline and extended sequential, Huffman-coded
_OTHER_SOF = {0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def sniff_jpeg(data) -> tuple[int, int] | None:
    """(height, width) of a JPEG whose batched decode matches PIL's, or None to leave it to PIL."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    # A cut file lacks its end marker; PIL then says "truncated" where a GPU decoder may fill in grey.
    if data.rfind(b"\xff\xd9", max(0, n - 4096)) < 0:
        return None
    pos, size = 2, None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        seg, end = pos + 4, pos + 2 + length
        if length < 2 or end > n:
            return None
        if marker == 0xDA:  # start of scan: the header is over
            break
        if marker in _SEQUENTIAL_SOF:
            if length < 17 or data[seg] != 8 or data[seg + 5] != 3:  # 8-bit, 3 components (not grey, not CMYK)
                return None
            if bytes(data[seg + 6:seg + 15:3]) == b"RGB":  # components named R, G, B: stored as RGB, not YCbCr
                return None
            size = ((data[seg + 1] << 8) | data[seg + 2], (data[seg + 3] << 8) | data[seg + 4])
        elif marker in _OTHER_SOF:  # progressive, lossless, arithmetic-coded
            return None
        elif marker == 0xEE and data[seg:seg + 5] == b"Adobe":
            if length < 14 or data[seg + 11] == 0:  # transform 0: RGB or CMYK stored without YCbCr
                return None
        elif marker == 0xE1:
            if data[seg:seg + 6] == b"Exif\x00\x00":
                if _exif_orientation(bytes(data[seg + 6:end])) != 1:
                    return None
            elif b"Orientation" in data[seg:end]:  # XMP orientation, which PIL's exif_transpose also honours
                return None
        pos = end
    if size is None or 0 in size:
        return None
    if size[0] * size[1] > Image.MAX_IMAGE_PIXELS:  # PIL refuses it as a decompression bomb: its reject
        return None
    return size


def _exif_orientation(tiff: bytes) -> int | None:
    """The IFD0 orientation tag (1 when absent), or None when the EXIF block cannot be read."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(count):
            tag, kind, _, value = struct.unpack_from(order + "HHI4s", tiff, ifd + 2 + 12 * k)
            if tag == 0x0112:
                return struct.unpack_from(order + "H", value)[0] if kind == 3 else None
        return 1
    except (KeyError, struct.error):
        return None


# --------------------------------------------------------------------------------------------- preprocessing
def _resized_size(h: int, w: int, size, max_size) -> tuple[int, int]:
    """The output size torchvision's Resize gives an (h, w) image: the short side to `size`, or (h, w) as given."""
    if isinstance(size, int) or len(size) == 1:
        target = size if isinstance(size, int) else size[0]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = target, int(target * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
        return (new_long, new_short) if w <= h else (new_short, new_long)
    return int(size[0]), int(size[1])


@dataclass(frozen=True)
class TensorPreprocess:
    """An encoder's PIL transform (resize, centre crop, to [0, 1], normalise) replayed on uint8 tensor batches."""

    steps: tuple  # ("resize", size, max_size, mode) and ("crop", (h, w)), in the transform's order
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_transform(cls, transform) -> TensorPreprocess | None:
        """None when the transform holds a step this class does not reproduce: the PIL path then runs."""
        parts = transform.transforms if isinstance(transform, T.Compose) else [transform]
        steps, to_tensor, normalised, mean, std = [], False, False, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        for t in parts:
            if isinstance(t, T.Resize) and not to_tensor:
                modes = (T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR)
                if t.interpolation not in modes or t.antialias is False:
                    return None
                steps.append(("resize", t.size, t.max_size, t.interpolation.value))
            elif isinstance(t, T.CenterCrop) and not to_tensor:
                steps.append(("crop", tuple(int(s) for s in t.size)))
            elif isinstance(t, T.ToTensor):  # open_clip's MaybeToTensor is one too
                to_tensor = True
            elif isinstance(t, T.Normalize) and to_tensor and not normalised:
                if len(t.mean) != 3 or len(t.std) != 3:
                    return None
                mean, std = tuple(float(m) for m in t.mean), tuple(float(s) for s in t.std)
                normalised = True
            elif _is_rgb_conversion(t):  # the decoder already gives RGB
                continue
            else:
                return None
        if not to_tensor or (not any(s[0] == "crop" for s in steps) and not _fixed_resize(steps)):
            return None  # outputs of varying size could not be stacked into a batch, by either path
        return cls(tuple(steps), mean, std)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        for step in self.steps:
            if step[0] == "resize":
                h, w = _resized_size(h, w, step[1], step[2])
            else:
                h, w = step[1]
        return h, w

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 [3, H, W] images (any sizes, one device) -> float32 [B, 3, h, w], normalised."""
        device = images[0].device
        groups: dict[tuple[int, int], list[int]] = {}
        for k, img in enumerate(images):
            groups.setdefault(tuple(img.shape[-2:]), []).append(k)
        if len(groups) == 1:  # the usual archive: tiles of one size
            out = self._geometry(torch.stack(images))
        else:
            parts = [self._geometry(torch.stack([images[k] for k in members])) for members in groups.values()]
            order = torch.tensor([k for members in groups.values() for k in members], device=device)
            grouped = torch.cat(parts)
            out = torch.empty_like(grouped).index_copy_(0, order, grouped)
        scale = torch.tensor([1 / (255 * s) for s in self.std], device=device).view(1, 3, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)], device=device).view(1, 3, 1, 1)
        return out.mul_(scale).add_(shift)

    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [k, 3, H, W] of one size -> float32 [k, 3, h, w] in 0..255, resized and cropped."""
        x = x.float()
        steps, k = self.steps, 0
        while k < len(steps):
            step = steps[k]
            h, w = x.shape[-2:]
            if step[0] == "resize":
                nh, nw = _resized_size(h, w, step[1], step[2])
                top, left, ch, cw = 0, 0, nh, nw
                if k + 1 < len(steps) and steps[k + 1][0] == "crop" and steps[k + 1][1][0] <= nh \
                        and steps[k + 1][1][1] <= nw:
                    # A centre crop right after the resize only drops output rows and columns: the resampling
                    # computes just the kept ones. Offsets as torchvision's center_crop.
                    ch, cw = steps[k + 1][1]
                    top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
                    k += 1
                # PIL resamples the width, stores uint8, then the height: doing the same (clamp and round
                # between the passes) lands within one grey level of it, where a single 2-D pass differs by
                # up to 8 at sharp edges. A side already at its size is left untouched, as by PIL.
                x = _resample(x, w, nw, left, cw, step[3], transpose=False)
                x = _resample(x.transpose(-1, -2), h, nh, top, ch, step[3], transpose=True).transpose(-1, -2)
            else:
                x = TF.center_crop(x, list(step[1]))
            k += 1
        return x.contiguous()


_weights_lock = threading.Lock()
_weights: dict = {}


def _resampling_weights(n_in: int, n_out: int, mode: str, device: torch.device) -> torch.Tensor:
    """[n_in, n_out]: column j holds the weights output j gives each input sample.

    Read off torch's antialiased interpolation (its port of PIL's filters: bicubic a=-0.5, support widened by
    the reduction factor) applied to the identity, so the matrix product is that same linear map, computed as
    one GEMM per pass instead of the interpolation kernel."""
    key = (n_in, n_out, mode, str(device))
    with _weights_lock:
        if key not in _weights:
            eye = torch.eye(n_in, dtype=torch.float32).view(1, 1, n_in, n_in)
            w = F.interpolate(eye, size=(n_in, n_out), mode=mode, antialias=True, align_corners=False)[0, 0]
            _weights[key] = w.to(device)
        return _weights[key]


def _resample(x: torch.Tensor, n_in: int, n_out: int, start: int, length: int, mode: str,
              transpose: bool) -> torch.Tensor:
    """Resample the last dimension of x from n_in to n_out samples, keeping outputs [start, start + length)."""
    if n_in == n_out:
        return x if (start, length) == (0, n_in) else x.narrow(-1, start, length)
    weights = _resampling_weights(n_in, n_out, mode, x.device)[:, start:start + length]
    # A transposed view is made contiguous first: the product is then one GEMM over all rows of the batch.
    out = (x.contiguous() if transpose else x) @ weights
    return out.clamp_(0, 255).round_()


def _fixed_resize(steps) -> bool:
    return any(s[0] == "resize" and not isinstance(s[1], int) and len(s[1]) == 2 for s in steps)


def _is_rgb_conversion(t) -> bool:
    name = getattr(t, "__name__", type(t).__name__)
    return name in ("_convert_to_rgb", "MaybeConvertMode") and getattr(t, "mode", "RGB") == "RGB"


# -------------------------------------------------------------------------------------------------- decoding
def decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 byte tensors -> uint8 [3, H, W] RGB images on `device` (nvJPEG on CUDA, libjpeg-turbo on CPU);
    None for a file the decoder refuses, so that the caller hands it to PIL."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    try:
        if device.type == "cuda":
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        return [decode_jpeg(d, mode=ImageReadMode.RGB) for d in datas]
    except RuntimeError:
        if len(datas) == 1:
            return [None]
    # One bad file fails a whole nvJPEG batch: find it by halves, keeping the rest of the batch on the GPU.
    half = len(datas) // 2
    return decode_jpegs(datas[:half], device) + decode_jpegs(datas[half:], device)


_probe_lock = threading.Lock()
_nvjpeg: dict[str, str | None] = {}


def nvjpeg_problem(device: torch.device) -> str | None:
    """None when torchvision decodes JPEGs with nvJPEG on `device`, else why not (checked once per device)."""
    key = str(device)
    with _probe_lock:
        if key not in _nvjpeg:
            try:
                from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

                ramp = torch.arange(16 * 16 * 3, dtype=torch.uint8).reshape(3, 16, 16)
                out = decode_jpeg([encode_jpeg(ramp)], mode=ImageReadMode.RGB, device=device)[0]
                _nvjpeg[key] = None if tuple(out.shape) == (3, 16, 16) else f"nvJPEG gave shape {tuple(out.shape)}"
            except Exception as e:  # not built with nvJPEG, no driver support, ...
                _nvjpeg[key] = f"{type(e).__name__}: {e}".splitlines()[0]
        return _nvjpeg[key]


def decode_and_preprocess(datas: list[torch.Tensor], sizes: list[tuple[int, int]], prep: TensorPreprocess,
                          device: torch.device) -> tuple[torch.Tensor | None, list[int], list[int]]:
    """Decode a batch and preprocess it. Returns (pixels [n_ok, 3, h, w] | None, positions of the decoded
    files in `datas`, positions of the ones left to PIL), both position lists ascending."""
    outputs: list[torch.Tensor] = []
    ok: list[int] = []
    failed: list[int] = []
    start = 0
    while start < len(datas):  # cut by pixel count, so a batch of huge scenes does not fill the GPU at once
        stop, pixels = start, 0
        while stop < len(datas) and (stop == start or pixels + sizes[stop][0] * sizes[stop][1] <= PIXEL_BUDGET):
            pixels += sizes[stop][0] * sizes[stop][1]
            stop += 1
        images = []
        for k, img in enumerate(decode_jpegs(datas[start:stop], device), start=start):
            if img is None or img.dim() != 3 or img.shape[0] != 3 or tuple(img.shape[1:]) != tuple(sizes[k]):
                failed.append(k)
            else:
                ok.append(k)
                images.append(img)
        if images:
            outputs.append(prep(images))
        start = stop
    if not outputs:
        return None, ok, failed
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), ok, failed
