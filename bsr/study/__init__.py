"""`bsr study`: a grid of fine-tuning runs from one YAML file, collected into one table and plot.

Does Block Selective Reprogramming (Sarkar et al., arXiv 2405.10951) keep the accuracy of full fine-tuning? A study
answers that on real data: every method of SPEC section 2 and any BSR ablation, on several target tasks, over several
seeds, each run through `bsr.train.train` exactly as `bsr train` runs it, next to the training memory, FLOPs and step
time of its configuration (measured by `bsr.measure.protocol`, as `bsr bench` measures them).

`grid` parses study files, `runner` runs and resumes them, `report` renders the outputs, `combine` pools the seeds
of several studies' outputs (`bsr study-combine`), `tokens` draws the kept patches (`bsr show-tokens`).
"""

from .combine import combine_studies, write_combined
from .grid import RunSpec, Study, load_study, parse_study
from .report import collect, pareto_front, study_markdown
from .runner import run_state, run_study
from .tokens import show_tokens

__all__ = ["RunSpec", "Study", "collect", "combine_studies", "load_study", "pareto_front", "parse_study", "run_state",
           "run_study", "show_tokens", "study_markdown", "write_combined"]
