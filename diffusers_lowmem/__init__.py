"""diffusers_lowmem: memory-lean LyCORIS + bitsandbytes fine-tuning for diffusers and transformers."""

__version__ = "0.1.0"

_LAZY_EXPORTS = {
    "quantize_model": "quantization",
    "QuantizationReport": "quantization",
    "AdapterConfig": "adapters",
    "attach_adapter": "adapters",
    "save_adapter": "adapters",
    "load_adapter": "adapters",
    "merge_adapter": "adapters",
    "MemoryTracker": "memory",
    "memory_breakdown": "memory",
}


def __getattr__(name):
    # Imports are lazy so `python -m diffusers_lowmem.tiny --help` does not pay for torch + diffusers twice.
    if name in _LAZY_EXPORTS:
        import importlib

        module = importlib.import_module(f"{__name__}.{_LAZY_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY_EXPORTS) + ["__version__"]
