from .lion import Lion
from .simba import Simba
from .tiger import Tiger, role_of, tiger_param_groups

__all__ = ["Lion", "Tiger", "Simba", "tiger_param_groups", "role_of"]
