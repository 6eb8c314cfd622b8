"""Compare a candidate bundle with the serving one on the same held-out eyes, and say whether to promote it.

`python -m training.compare CANDIDATE SERVING --manifest PATH [--split test] [--out DIR]`: both bundles run
through the runtime engine (`training.compare.scoring`) on the same eyes; every benchmark figure of both,
with paired-bootstrap intervals of each and of their difference (`training.compare.bootstrap`); a verdict
by the rule stated in `bootstrap.RULE`; JSON and Markdown in the output folder (`training.compare.report`).
"""

from training.compare.bootstrap import Outcomes, paired_bootstrap, rule_text, verdict

__all__ = ["Outcomes", "paired_bootstrap", "rule_text", "verdict"]
