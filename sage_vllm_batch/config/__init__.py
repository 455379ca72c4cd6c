"""The job config: the structured schema (registered with Hydra's ConfigStore on import), its
cross-field rules, composition from Python, and the ``sampling.structured_outputs`` constraint."""

from sage_vllm_batch.config.choices import *  # noqa: F403  (the fixed sets of strings, as enums)
from sage_vllm_batch.config.choices import __all__ as _choice_names
from sage_vllm_batch.config.schema import *  # noqa: F403  (the schema dataclasses and constants)
from sage_vllm_batch.config.schema import __all__ as _schema_names
from sage_vllm_batch.config.validate import validate

__all__ = [*_choice_names, *_schema_names, "validate"]
