"""jaxvlm: fine-tune vision-language models in JAX/Flax with Unsloth's FastVisionModel API."""
import importlib.util as _util
import os as _os
import sys as _sys

# The HF <-> jaxvlm weight converters live in the top-level converters/ folder and are installed as
# jaxvlm.converters (pyproject's package-dir). A source checkout used without installing (PYTHONPATH=.)
# gets the same module name here.
if "jaxvlm.converters" not in _sys.modules and not _os.path.isdir(_os.path.join(__path__[0], "converters")):
    _here = _os.path.join(_os.path.dirname(__path__[0]), "converters")
    if _os.path.isfile(_os.path.join(_here, "__init__.py")) and _util.find_spec("jaxvlm.converters") is None:
        _spec = _util.spec_from_file_location("jaxvlm.converters", _os.path.join(_here, "__init__.py"),
                                              submodule_search_locations=[_here])
        _sys.modules["jaxvlm.converters"] = _module = _util.module_from_spec(_spec)
        _spec.loader.exec_module(_module)

from jaxvlm.compilation_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache()  # compiled programs kept on disk for the next run (JAXVLM_COMPILATION_CACHE=0: off)

from jaxvlm.fast_vision_model import FastModel, FastVisionModel  # noqa: E402

__all__ = ["FastModel", "FastVisionModel"]
