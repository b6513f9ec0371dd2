"""Name -> timm model tables for teachers and students, weight loading, and checkpoints plain timm can load.

timm does the work (`create_model`, `pretrained_cfg`, `forward_features`, `forward_intermediates`, its checkpoint
filters); these modules add what fdpipe needs on top:

- `teachers`: the alias table, `Teacher` (the extraction rule: tokens + whitening), `TeacherInfo`, `create_teacher`;
- `students`: the fd-vit table, `StudentSpec`, `create_student` and the patch-grid helpers;
- `weights`: where teacher weights come from (in order), reading and hashing weight files;
- `checkpoint`: `save_model` / `load_model`, a safetensors + config.json layout plain timm loads;
- `distiller`: the student as it is distilled (`Distiller`: student + projection), `check_grid`, `fd_loss`.
"""

from .checkpoint import load_model, save_model
from .distiller import Distiller, check_grid, fd_loss
from .students import (BEIT_ARCH, STUDENTS, StudentSpec, check_model_size, create_student, matching_image_size,
                       num_prefix_tokens, student_grid)
from .teachers import TEACHERS, WHITENING, Teacher, TeacherInfo, create_teacher, resolve_teacher_name, whiten
from .weights import file_sha256, state_dict_sha256

__all__ = [
    "TEACHERS", "STUDENTS", "WHITENING", "BEIT_ARCH", "whiten",
    "TeacherInfo", "Teacher", "create_teacher", "resolve_teacher_name",
    "StudentSpec", "create_student", "check_model_size", "student_grid", "num_prefix_tokens", "matching_image_size",
    "save_model", "load_model", "file_sha256", "state_dict_sha256",
    "Distiller", "check_grid", "fd_loss",
]
