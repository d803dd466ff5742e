"""The user's own network for ``deepfit measure``: a Python definition plus a weights file.

``--model-def path/to/file.py:ClassName`` (or ``package.module:factory``) names code the user wrote;
it is imported and called with ``--model-kwargs`` (a JSON object). ``--weights FILE`` holds the
trained parameters, read without unpickling anything: a ``torch.save(model.state_dict())`` file
(``torch.load(weights_only=True)``), a safetensors file, a TorchScript archive (``torch.jit.load``,
whose restricted loader runs no Python, only its ``state_dict()`` is used) or a ``torch.export``
``.pt2`` archive (its raw weight records; records that would need pickle are refused). The measures
need the module tree (Linear, Conv2d, BatchNorm, ...), which TorchScript and exported programs do
not keep, so those archives serve as weights for a ``--model-def`` and are not measured alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from kernelfit.errors import InputError, ModelFileError

__all__ = ["load_model_def", "load_weights", "build_user_model", "zip_member_names", "WHOLE_MODEL_FIX"]

WHOLE_MODEL_FIX = ("Fix: save the weights only, torch.save(model.state_dict(), 'weights.pt'), and measure with "
                   "`deepfit measure --model-def your_file.py:YourClass --weights weights.pt --dataset NAME`")


def load_model_def(spec: str, kwargs_json: str | None = None) -> nn.Module:
    """``FILE.py:NAME`` or ``module:NAME`` -> ``NAME(**kwargs)``, which must be an ``nn.Module``."""
    where, sep, attr = str(spec).rpartition(":")
    if not sep or not where or not attr.isidentifier():
        raise InputError(f"--model-def expects FILE.py:ClassName or package.module:factory, got {spec!r}. "
                         "Fix: e.g. --model-def mynet.py:Net.")
    kwargs = {}
    if kwargs_json:
        try:
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as e:
            raise InputError(f"--model-kwargs is not valid JSON ({e.msg} at position {e.pos}): {kwargs_json!r}. "
                             'Fix: a JSON object such as \'{"width": 64}\'.') from None
        if not isinstance(kwargs, dict):
            raise InputError(f"--model-kwargs must be a JSON object (keyword arguments), got {type(kwargs).__name__}. "
                             'Fix: e.g. \'{"width": 64}\'.')
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise InputError(f"--model-def file {str(path)!r} does not exist. Fix: give the path of the .py file that "
                             "defines the network, then ':ClassName'.")
        name = f"_deepfit_user_model_{abs(hash(str(path.resolve())))}"
        mspec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mspec)
        sys.path.insert(0, str(path.parent.resolve()))   # so the file can import its neighbours
        try:
            mspec.loader.exec_module(module)
        except Exception as e:
            raise InputError(f"importing --model-def {str(path)!r} failed: {type(e).__name__}: {e} "
                             "(--debug shows the traceback)") from e
        finally:
            sys.path.remove(str(path.parent.resolve()))
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise InputError(f"cannot import module {where!r} for --model-def: {type(e).__name__}: {e}. Fix: install "
                             "it, run from the directory that holds it, or give FILE.py:ClassName.") from e
    if not hasattr(module, attr):
        found = sorted(n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)
                       and getattr(v, "__module__", None) == module.__name__)
        raise InputError(f"--model-def {spec!r}: {where!r} defines no {attr!r}; nn.Module classes defined there: "
                         f"{', '.join(found) or 'none'}.")
    try:
        model = getattr(module, attr)(**kwargs)
    except Exception as e:
        raise InputError(f"--model-def {spec!r}: calling {attr}(**{kwargs}) failed: {type(e).__name__}: {e}. "
                         "Fix: pass its arguments with --model-kwargs JSON.") from e
    if not isinstance(model, nn.Module):
        raise InputError(f"--model-def {spec!r} returned a {type(model).__name__}, expected a torch.nn.Module.")
    return model


def zip_member_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def _pt2_state_dict(path: Path, names: list[str]) -> dict:
    """The weight records of a torch.export archive, read raw (torch.export.load would fall back to pickle)."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    cfg_names = [n for n in names if n.endswith("data/weights/model_weights_config.json")]
    if not cfg_names:
        raise ModelFileError(f"--weights {str(path)!r} is a torch.export archive in a layout this reader does not know "
                             "(no data/weights/model_weights_config.json). Fix: save torch.save(model.state_dict(), "
                             "'weights.pt') and pass that.")
    base = cfg_names[0][: -len("model_weights_config.json")]
    with zipfile.ZipFile(path) as z:
        config = json.loads(z.read(cfg_names[0]))["config"]
        out = {}
        for fqn, meta in config.items():
            if meta.get("use_pickle"):
                raise ModelFileError(f"refusing to load --weights {str(path)!r}: its weight {fqn!r} is stored as a "
                                     f"pickled object, which loading would have to run. {WHOLE_MODEL_FIX}.")
            tm = meta["tensor_meta"]
            dtype = _SERIALIZE_TO_TORCH_DTYPE[tm["dtype"]]
            raw = bytearray(z.read(base + meta["path_name"]))
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.zeros(0, dtype=dtype)
            size = [s["as_int"] for s in tm["sizes"]]
            stride = [s["as_int"] for s in tm["strides"]]
            out[fqn] = torch.as_strided(flat, size, stride, tm["storage_offset"]["as_int"]).clone()
    return out


def load_weights(path) -> tuple[dict, str]:
    """A state dict from ``path`` and the format it was read as; nothing is unpickled."""
    from .train import load_torch_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"--weights {str(p)!r} does not exist. Fix: save torch.save(model.state_dict(), PATH) and "
                         "pass PATH.")
    names = zip_member_names(p)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(p), device="cpu"), "safetensors"
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFileError(f"--weights {str(p)!r} is not a readable safetensors file ({e}).") from None
    if any(n.endswith("/archive_format") for n in names) and any("/data/weights/" in n for n in names):
        return _pt2_state_dict(p, names), "torch.export"
    if any("/code/__torch__/" in n for n in names):
        import warnings
        try:
            with warnings.catch_warnings():   # torch 2.9+ marks TorchScript deprecated; the archive is still read
                warnings.simplefilter("ignore", DeprecationWarning)
                return dict(torch.jit.load(str(p), map_location="cpu").state_dict()), "torchscript"
        except RuntimeError as e:
            raise ModelFileError(f"--weights {str(p)!r} looks like a TorchScript archive but could not be read "
                                 f"({str(e).splitlines()[0][:160]}).") from None
    try:
        sd = load_torch_file(p, "--weights")
    except ModelFileError as e:
        if "pickled Python object (" in str(e):
            found = str(e)[str(e).index("pickled Python object ("):].split(";")[0]
            raise ModelFileError(f"refusing to load --weights {str(p)!r}: it holds a {found}, e.g. a whole model saved with "
                                 "torch.save(model); rebuilding it would need full unpickling, which can run any code, so "
                                 f"nothing was loaded. {WHOLE_MODEL_FIX}.") from None
        raise
    if isinstance(sd, dict):
        for key in ("state_dict", "model_state_dict", "model"):   # common wrappers: {"state_dict": {...}, ...}
            if isinstance(sd.get(key), dict) and not all(isinstance(v, torch.Tensor) for v in sd.values()):
                return sd[key], f"torch state dict (key {key!r})"
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelFileError(f"--weights {str(p)!r} holds a {type(sd).__name__}, not a state dict (a dict of parameter "
                             f"names to tensors). {WHOLE_MODEL_FIX}.")
    return sd, "torch state dict"


def build_user_model(spec: str, weights, kwargs_json: str | None = None) -> tuple[nn.Module, dict]:
    """The user's network with its trained weights (eval mode), and a record of where it came from."""
    sd, fmt = load_weights(weights)   # the file first: cheap, and refused before the user's code runs
    with torch.random.fork_rng():     # the constructor's random init must not move the caller's RNG
        model = load_model_def(spec, kwargs_json)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")
        parts = ([f"missing in the file: {few(missing)}"] if missing else []) + \
            ([f"not in the model: {few(unexpected)}"] if unexpected else []) + \
            ([f"shapes differ: {few(shapes)}"] if shapes else [])
        raise InputError(f"--weights {str(weights)!r} does not fit --model-def {spec!r}: {'; '.join(parts)}. Fix: pass the "
                         "definition (and --model-kwargs) the weights were trained with.")
    model.load_state_dict(sd)
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
    return model.eval(), dict(model_def=str(spec), model_kwargs=json.loads(kwargs_json) if kwargs_json else {},
                              weights=str(weights), weights_format=fmt)
