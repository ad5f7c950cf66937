"""AdamW dispatch: `build_adamw(param_groups, lr, betas, ...) -> (optimizer, backend_name)`."""

from .adamw import BUILDERS, BackendUnavailable, auto_order, build_adamw

__all__ = ['build_adamw', 'BUILDERS', 'BackendUnavailable', 'auto_order']
