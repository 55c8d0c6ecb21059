"""Homework question 1.3: identities of multi-head self-attention, checked numerically.

  python launch.py --config=configs/attention.py --mode=attention_check
  python launch.py --config=configs/attention.py --mode=summary

Expected: `7 of 7 checks passed.` and exit code 0 (1 if any check fails). Time: not measured.
Variant `configs/attention.py:scaled` divides scores by sqrt(d) (the checks account for it).
"""

from ml_collections import config_dict


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()
  config.seed = 0  # the one seed: X, the initial weights and B

  config.model = config_dict.ConfigDict()
  config.model.name = 'self_attention'  # cnn_caption/models registry key
  config.model.input_shape = (6, 8)  # (L, n): sequence length, model width of X
  config.model.num_heads = 2  # H; the check transforms head 2 from head 1
  config.model.head_dim = 3  # d <= n, so rank(A(h)) <= d < n is visible
  config.model.scale_scores = False  # False: P = softmax(X A X^T) as in the homework; True: / sqrt(d)

  config.check = config_dict.ConfigDict()
  config.check.prob_atol = 1e-5  # max |P(h) - row-softmax(X A(h) X^T)|, float32 module vs float64 formula
  config.check.rank_rtol = 1e-5  # singular values <= rank_rtol * s_1 count as zero (A is float32)
  config.check.same_atol32 = 1e-5  # max |P(1) - P(2)| in float32 when A(2) = A(1)
  config.check.same_atol64 = 1e-12  # the same in float64
  config.check.control_min_diff = 1e-4  # B on W_Q alone must move P this much (10x same_atol32)
  config.check.b_singular_range = (1.25, 2.0)  # B's singular values are r or 1/r, r in this range

  if arg == 'scaled':
    config.model.scale_scores = True
  elif arg not in (None, ''):
    raise ValueError(f'unknown variant {arg!r} of configs/attention.py; use "scaled" or nothing')
  return config
