"""Weight conversion: torchvision ``.pth`` / timm ``.safetensors`` -> jaxtl variables, safely.

* :func:`load_torchvision` / :func:`load_timm`: a file -> ``{"params", "batch_stats"}`` (body, plus
  ``params/head/fc`` when the file has ``fc``); strict name/shape checking.
* :func:`save_variables` / :func:`load_variables`: jaxtl's safetensors weight format.
* :func:`load_pretrained`: registry name (``resnet34.tv_in1k``, ...) or local file -> variables,
  with a verified download cache.
* :func:`merge_pretrained`: pretrained body (+ matching linear head) into freshly initialised variables;
  :func:`init_with_pretrained` does both without initialising the replaced body.
* ``python -m jaxtl.convert SRC --arch ARCH --out DST``: the command-line converter.

``.pth`` files are read by a restricted unpickler that never imports torch or runs pickled code.
"""

from jaxtl.convert.io import detect_format, load_variables, read_safetensors, save_variables
from jaxtl.convert.mapping import (
    ConversionError,
    load_timm,
    load_torchvision,
    name_table,
    state_dict_to_variables,
    variables_to_state_dict,
)
from jaxtl.convert.merge import init_with_pretrained, merge_pretrained
from jaxtl.convert.registry import (
    REGISTRY,
    HashMismatchError,
    PretrainedEntry,
    PretrainedUnavailableError,
    convert_file,
    default_cache_dir,
    fetch,
    load_pretrained,
    register,
)
from jaxtl.convert.torch_pickle import TorchFileError, UnsafePickleError, load_torch_state_dict

__all__ = [
    "REGISTRY", "ConversionError", "HashMismatchError", "PretrainedEntry", "PretrainedUnavailableError",
    "TorchFileError", "UnsafePickleError", "convert_file", "default_cache_dir", "detect_format", "fetch",
    "init_with_pretrained", "load_pretrained", "load_timm", "load_torch_state_dict", "load_torchvision",
    "load_variables", "merge_pretrained", "name_table", "read_safetensors", "register", "save_variables",
    "state_dict_to_variables", "variables_to_state_dict",
]
