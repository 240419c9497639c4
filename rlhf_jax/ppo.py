"""PPO and PPO-ptx (InstructGPT §3.5 and App. C.3; Ziegler et al. 2019, "OAI-2019").

One iteration is three jitted functions, all pure:

  `rollout`   the KV-cache sampler on a batch of left-padded prompts (`sampling.generate`);
  `score`     policy log-probs (taken from the sampler, or recomputed), reference log-probs, values
              and the RM score -> per-token rewards -> GAE -> whitened advantages;
  `update`    every PPO epoch and minibatch in one `lax.scan` (a fresh permutation per epoch), the
              clipped surrogate and clipped value loss, the PPO-ptx pretraining gradient added to
              each minibatch's gradient before its one optimizer step, the EMA of the policy and
              the KL controller; the state is donated.

Shapes: prompts [B, P] (left-padded, so every prompt ends at slot P - 1), responses [B, N]
(right-padded after the stop token). Per-token arrays are response-aligned [B, N]: entry t is
about response token t, whose logits are read at sequence position P - 1 + t, and whose value is
the value of the state before it (also read at position P - 1 + t). Per-token maths below accept
any padding of the response (left or right), as long as its real tokens are contiguous.

PPO-ptx: the pretraining term is γ times the *per-token mean* negative log-likelihood of the
pretraining minibatch (the same normalisation as the SFT loss), added to the PPO loss; the paper
does not say which normalisation it used. At full size the pretraining rows of one minibatch (8 per
episode, 2048 tokens each) do not fit in memory at once: with `ptx_microbatches` = k > 1 their
gradient is accumulated over k chunks (a `lax.scan`; sums of token NLLs and of token counts, so the
per-token mean is the same as in one pass) and added to the PPO gradient before the one step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import losses, model as model_lib, sampling
from rlhf_jax import state as state_lib

KL_ESTIMATORS = ('k1', 'k2', 'k3', 'abs')
VALUE_MODELS = ('separate', 'shared')


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """The algorithm's switches (`config.ppo`). InstructGPT values are the defaults of its experiments."""
  beta: float = 0.02               # KL coefficient (the initial one with the adaptive controller)
  adaptive_kl: bool = False        # OAI-2019's controller: beta follows kl_target over kl_horizon episodes
  kl_target: float = 6.0
  kl_horizon: int = 10000
  kl_estimator: str = 'k1'         # k1: log π - log π_ref (default); k2: ½ (log ratio)²; k3: r - 1 - log r; abs
  gamma: float = 1.0
  lam: float = 0.95
  clip: float = 0.2                # policy ratio clip ε
  value_clip: float = 0.2          # value-loss clip range (0 = no clipping)
  vf_coef: float = 0.1
  ent_coef: float = 0.0            # entropy bonus
  epochs: int = 1                  # PPO epochs per iteration
  minibatches: int = 8             # minibatches per epoch (InstructGPT: 512 episodes / 64)
  whiten_rewards: bool = False     # OAI-2019: rewards scaled to unit variance, mean kept
  whiten_advantages: bool = True
  temperature: float = 1.0         # sampling temperature
  logprob_temperature: bool = True  # log-probs of logits / temperature (OAI-2019); False: of the raw logits
  stop_token: int = -1             # truncate the response after this token (-1: the tokenizer's EOS)
  truncate_after: int = 0          # ... at its first occurrence at or after this response position
  penalize_no_stop: bool = False   # OAI-2019: a response with no stop token scores `penalty`, not the RM's
  penalty: float = -1.0
  recompute_logprobs: bool = False  # recompute the rollout's log-probs in the scoring pass
  value_model: str = 'separate'    # 'separate' (initialised from the RM) or 'shared' (policy trunk + zero head)
  ptx_coef: float = 0.0            # PPO-ptx γ (InstructGPT: 27.8); 0 = plain PPO
  ptx_ratio: int = 8               # pretraining sequences per PPO episode in each minibatch
  ptx_microbatches: int = 1        # the pretraining gradient accumulated over this many chunks (memory)
  ema_decay: float = 0.992         # EMA of policy weights per optimizer step (0 = off)

  def __post_init__(self):
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(f'ppo.kl_estimator={self.kl_estimator!r}; valid: {KL_ESTIMATORS}')
    if self.value_model not in VALUE_MODELS:
      raise ValueError(f'ppo.value_model={self.value_model!r}; valid: {VALUE_MODELS}')
    for k in ('epochs', 'minibatches', 'ptx_microbatches'):
      if getattr(self, k) < 1:
        raise ValueError(f'ppo.{k} must be >= 1, got {getattr(self, k)}')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'PPOConfig':
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f'unknown ppo config key(s) {sorted(unknown)}; valid: {sorted(names)}')
    return cls(**d)


# ----------------------------------------------------------------------------
# Per-token maths (response-aligned [B, N] arrays; mask 1 = real response token).


def kl_penalty(logp, ref_logp, estimator: str = 'k1'):
  """Per-token KL estimate from log π and log π_ref of the sampled tokens."""
  d = logp - ref_logp
  if estimator == 'k1':
    return d
  if estimator == 'k2':
    return 0.5 * d ** 2
  if estimator == 'k3':        # E_π[(π_ref/π) - 1 - log(π_ref/π)]: unbiased and >= 0
    return jnp.expm1(-d) + d
  if estimator == 'abs':
    return jnp.abs(d)
  raise ValueError(f'kl estimator {estimator!r}; valid: {KL_ESTIMATORS}')


def last_index(mask):
  """Index of each row's last real token [B] (0 for an empty row)."""
  N = mask.shape[-1]
  real = mask > 0
  return jnp.where(real.any(-1), N - 1 - jnp.argmax(real[..., ::-1], axis=-1), 0)


def token_rewards(kl, mask, score, beta):
  """r_t = -β·kl_t on real tokens, plus the score at the last real token. kl [B, N], score [B]."""
  mask = mask.astype(kl.dtype)
  last = jax.nn.one_hot(last_index(mask), mask.shape[-1], dtype=kl.dtype) * mask
  return -beta * kl * mask + last * score[:, None]


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
  """Generalised advantage estimation by a reverse scan over the response.

  δ_t = r_t + γ V_{t+1} - V_t with V = 0 after the last real token; A_t = δ_t + γλ A_{t+1}.
  Returns (advantages, returns = A + V), both 0 on padding."""
  mask = mask.astype(rewards.dtype)
  values = values * mask
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  deltas = (rewards + gamma * next_values - values) * mask
  next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)

  def step(carry, x):
    delta, m, nm = x
    adv = (delta + gamma * lam * carry * nm) * m
    return adv, adv

  _, adv = jax.lax.scan(step, jnp.zeros_like(rewards[:, 0]), (deltas.T, mask.T, next_mask.T), reverse=True)
  adv = adv.T
  return adv, (adv + values) * mask


def masked_moments(x, mask):
  mask = mask.astype(x.dtype)
  n = jnp.maximum(mask.sum(), 1.0)
  mean = (x * mask).sum() / n
  var = (((x - mean) * mask) ** 2).sum() / n
  return mean, var


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
  """(x - mean) / std over the real tokens; with shift_mean=False the mean is added back (OAI-2019's
  reward scaling). 0 on padding."""
  mean, var = masked_moments(x, mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * mask.astype(x.dtype)


def policy_loss(new_logp, old_logp, advantages, mask, clip: float):
  """Clipped surrogate: mean over real tokens of max(-A·ρ, -A·clip(ρ, 1 ± ε)).
  Returns (loss, {'clipfrac', 'approx_kl'})."""
  ratio = jnp.exp(new_logp - old_logp)
  loss = jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, 1 - clip, 1 + clip))
  clipped = (jnp.abs(ratio - 1) > clip).astype(jnp.float32)
  approx_kl = 0.5 * (new_logp - old_logp) ** 2
  return losses.masked_mean(loss, mask), {'clipfrac': losses.masked_mean(clipped, mask),
                                          'approx_kl': losses.masked_mean(approx_kl, mask)}


def value_loss(new_values, old_values, returns, mask, clip: float):
  """½ mean over real tokens of max((V' - R)², (V + clip(V' - V, ±c) - R)²); no clipping if c = 0.
  Returns (loss, {'clipfrac'})."""
  err = (new_values - returns) ** 2
  if clip > 0:
    clipped_v = old_values + jnp.clip(new_values - old_values, -clip, clip)
    err = jnp.maximum(err, (clipped_v - returns) ** 2)
    frac = (jnp.abs(new_values - old_values) > clip).astype(jnp.float32)
  else:
    frac = jnp.zeros_like(err)
  return 0.5 * losses.masked_mean(err, mask), {'clipfrac': losses.masked_mean(frac, mask)}


def kl_controller(beta, kl, n_episodes, *, target: float, horizon: int):
  """OAI-2019's adaptive coefficient: β ← β·(1 + clip(KL/target - 1, ±0.2)·n/horizon)."""
  err = jnp.clip(kl / target - 1.0, -0.2, 0.2)
  return beta * (1.0 + err * n_episodes / horizon)


def truncate_at_stop(tokens, mask, stop_id: int, after: int = 0):
  """Keep each response up to and including its first `stop_id` at or after position `after`.
  Returns (mask, has_stop [B])."""
  N = tokens.shape[-1]
  hit = (tokens == stop_id) & (mask > 0) & (jnp.arange(N) >= after)
  has = hit.any(-1)
  first = jnp.argmax(hit, -1)
  keep = jnp.where(has[:, None], jnp.arange(N) <= first[:, None], True)
  return (mask * keep).astype(mask.dtype), has


def explained_variance(values, returns, mask):
  _, var_r = masked_moments(returns, mask)
  _, var_e = masked_moments(returns - values, mask)
  return 1.0 - var_e / jnp.maximum(var_r, 1e-8)


# ----------------------------------------------------------------------------
# Models on (prompt, response) sequences.


def sequences(prompt_ids, prompt_mask, response, response_mask):
  """The model's inputs for prompt + response: tokens, mask, positions [B, P + N]."""
  tokens = jnp.concatenate([prompt_ids, response], axis=1)
  mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
  return tokens, mask, model_lib.default_positions(mask)


def response_states(model, params, tokens, mask, positions, P: int):
  """Final hidden states that predict each response token: positions P - 1 .. P + N - 2 [B, N, D]
  (the last block runs at positions P - 1 .. P + N - 1 only)."""
  h, _ = model.apply({'params': params}, tokens, positions, mask, read_from=P - 1, method='trunk')
  return h[:, :-1]


def logprobs_from_states(model, params, h, response, *, temperature: float, vocab_size: int | None):
  """(log-probs of the response tokens [B, N], entropy [B, N]) from states h [B, N, D]: the logits
  only where they are needed, over the tokenizer's ids, divided by the temperature."""
  logits = model.apply({'params': params}, h, method='logits')
  if vocab_size is not None:
    logits = logits[..., :vocab_size]
  if temperature != 1.0:
    logits = logits / temperature
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  logp = jnp.take_along_axis(logp_all, response[..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp, entropy


@dataclasses.dataclass(frozen=True)
class Models:
  """The networks and constants the PPO functions close over (hashable: jit statics)."""
  policy: model_lib.Transformer          # the LM (with a scalar head in the 'shared' value mode)
  value: model_lib.Transformer | None    # the value network ('separate' mode), shaped like the RM
  reward: model_lib.Transformer | None   # the frozen RM (None: the score comes from outside, see `score`)
  reference: model_lib.Transformer | None = None  # the frozen SFT policy's shape (default: policy)
  reward_gain: float = 1.0               # the RM's normalisation (reward.Normalization)
  reward_bias: float = 0.0
  vocab_size: int | None = None          # the tokenizer's: log-probs over these ids only
  stop_id: int = 0                       # the stop token (EOS unless ppo.stop_token is set)

  @property
  def ref(self) -> model_lib.Transformer:
    return self.reference or self.policy

  def logprob_temperature(self, cfg: PPOConfig) -> float:
    return cfg.temperature if cfg.logprob_temperature and cfg.temperature > 0 else 1.0


def policy_and_value(params, tokens, mask, positions, response, *, models: Models, cfg: PPOConfig, P: int):
  """(log-probs [B, N], entropy [B, N], values [B, N]) of the current policy and value function."""
  h = response_states(models.policy, params['policy'], tokens, mask, positions, P)
  logp, ent = logprobs_from_states(models.policy, params['policy'], h, response,
                                   temperature=models.logprob_temperature(cfg), vocab_size=models.vocab_size)
  if cfg.value_model == 'shared':
    values = models.policy.apply({'params': params['policy']}, h, method='score')
  else:
    hv = response_states(models.value, params['value'], tokens, mask, positions, P)
    values = models.value.apply({'params': params['value']}, hv, method='score')
  return logp, ent, values


# ----------------------------------------------------------------------------
# The train state.


@flax.struct.dataclass
class PPOState(state_lib.TrainState):
  """TrainState (step = PPO iterations done; params {'policy', 'value'}) plus the EMA of the
  policy's weights and the KL coefficient β (the adaptive controller's state)."""
  ema: Any = None
  kl_coef: jax.Array = None


def make_init(init_policy, init_value, tx: optax.GradientTransformation, cfg: PPOConfig):
  """seed -> PPOState with fresh params (boxed, for `sharding.init_sharded`); the loop then loads
  the policy from the SFT checkpoint and the value network from the RM checkpoint."""
  def init(seed):
    key = jax.random.key(seed)
    policy = init_policy(jax.random.fold_in(key, 0))
    params = {'policy': policy}
    if init_value is not None:
      params['value'] = init_value(jax.random.fold_in(key, 2))
    return PPOState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.fold_in(key, 1)), bad_step=jnp.full((), -1, jnp.int32),
                    ema=policy, kl_coef=jnp.asarray(cfg.beta, jnp.float32))
  return init


def make_tx(policy_tx: optax.GradientTransformation, value_tx: optax.GradientTransformation | None):
  """One optimizer over {'policy', 'value'}: each network has its own transformation (its own
  learning rate and gradient clipping) and its own state, keyed like the params."""
  txs = {'policy': policy_tx} if value_tx is None else {'policy': policy_tx, 'value': value_tx}

  def init(params):
    return {k: tx.init(params[k]) for k, tx in txs.items()}

  def update(updates, state, params=None):
    out, new = {}, {}
    for k, tx in txs.items():
      out[k], new[k] = tx.update(updates[k], state[k], None if params is None else params[k])
    return out, new
  return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------
# Rollout and scoring.


def sample_config(cfg: PPOConfig, models: Models, *, max_new_tokens: int, eos_id: int | None, pad_id: int):
  return sampling.SampleConfig(max_new_tokens=max_new_tokens, temperature=cfg.temperature, eos_id=eos_id,
                               pad_id=pad_id, vocab_size=models.vocab_size)


def rollout(state: PPOState, batch, *, models: Models, sample_cfg: sampling.SampleConfig):
  """Sample responses of the current policy to batch['prompt_ids'/'prompt_mask'] ([B, P], left-padded).
  The key is the state's (fold_in of rng and step), so a resumed run samples the same responses."""
  return sampling.generate(state.params['policy'], batch['prompt_ids'], batch['prompt_mask'], state.key(0),
                           model=models.policy, cfg=sample_cfg)


def score(state: PPOState, ref_params, rm_params, batch, sample, external_score=None, *, models: Models,
          cfg: PPOConfig):
  """Everything the update needs, from one rollout: (rollouts, metrics).

  rollouts holds the inputs (prompt_ids, prompt_mask, response, response_mask), per response
  token [B, N] logp (old log-probs), values, advantages, returns, and per episode kl [B]. The response is cut after the
  stop token (`ppo.stop_token`, `ppo.truncate_after`) before anything is scored; a response without
  one scores `ppo.penalty` when `ppo.penalize_no_stop`. Rewards: r_t = -β·kl_t, plus the normalised RM score
  at the last real token. external_score [B] (optional) replaces the RM's score: a reward computed
  outside the model, such as the embedded task's gold labeler (an oracle-reward run)."""
  P = batch['prompt_ids'].shape[1]
  response = sample['tokens']
  rmask, has_stop = truncate_at_stop(response, sample['mask'], models.stop_id, cfg.truncate_after)
  tokens, mask, positions = sequences(batch['prompt_ids'], batch['prompt_mask'], response, rmask)
  temp = models.logprob_temperature(cfg)
  params = state.params
  if cfg.recompute_logprobs or cfg.value_model == 'shared' or temp != cfg.temperature:
    logp, _, values = policy_and_value(params, tokens, mask, positions, response, models=models, cfg=cfg, P=P)
  else:  # the sampler's log-probs are those of logits / temperature: reuse them
    logp = sample['logprobs']
    hv = response_states(models.value, params['value'], tokens, mask, positions, P)
    values = models.value.apply({'params': params['value']}, hv, method='score')
  h_ref = response_states(models.ref, ref_params, tokens, mask, positions, P)
  ref_logp, _ = logprobs_from_states(models.ref, ref_params, h_ref, response, temperature=temp,
                                     vocab_size=models.vocab_size)
  read_at = P + last_index(rmask)
  if external_score is None:
    raw = models.reward.apply({'params': rm_params}, tokens, positions, mask, read_at, method='score_at')
    rm_score = raw * models.reward_gain + models.reward_bias
  else:
    rm_score = external_score.astype(jnp.float32)
  episode_score = jnp.where(has_stop, rm_score, cfg.penalty) if cfg.penalize_no_stop else rm_score
  m = rmask.astype(jnp.float32)
  logp, ref_logp, values = logp * m, ref_logp * m, values * m
  kl = kl_penalty(logp, ref_logp, cfg.kl_estimator) * m
  rewards = token_rewards(kl, m, episode_score, state.kl_coef)
  if cfg.whiten_rewards:
    rewards = whiten(rewards, m, shift_mean=False)
  adv, returns = gae(rewards, values, m, cfg.gamma, cfg.lam)
  if cfg.whiten_advantages:
    adv = whiten(adv, m)
  rollouts = {'prompt_ids': batch['prompt_ids'], 'prompt_mask': batch['prompt_mask'], 'response': response,
              'response_mask': rmask, 'logp': logp, 'values': values, 'advantages': adv, 'returns': returns}
  length = m.sum(-1)
  kl_seq = ((logp - ref_logp) * m).sum(-1)       # log π/π_ref summed over the response: the KL
  rollouts['kl'] = kl_seq
  metrics = {'objective/score': episode_score.mean(), 'objective/rm_score': rm_score.mean(),
             'objective/kl': kl_seq.mean(), 'objective/kl_coef': state.kl_coef,
             'objective/score_total': (episode_score - state.kl_coef * (kl * m).sum(-1)).mean(),
             'ppo/response_length': length.mean(), 'ppo/no_stop_frac': 1.0 - has_stop.mean(),
             'ppo/returns_mean': losses.masked_mean(returns, m),
             'ppo/values_mean': losses.masked_mean(values, m),
             'ppo/explained_variance': explained_variance(values, returns, m)}
  return rollouts, metrics


# ----------------------------------------------------------------------------
# The update.


def minibatch_loss(params, mb, ptx, *, models: Models, cfg: PPOConfig):
  """PPO loss of one minibatch (+ γ · per-token mean pretraining NLL of `ptx`, if given)."""
  P = mb['prompt_ids'].shape[1]
  tokens, mask, positions = sequences(mb['prompt_ids'], mb['prompt_mask'], mb['response'], mb['response_mask'])
  logp, ent, values = policy_and_value(params, tokens, mask, positions, mb['response'], models=models, cfg=cfg, P=P)
  m = mb['response_mask']
  pg, pm = policy_loss(logp, mb['logp'], mb['advantages'], m, cfg.clip)
  vl, vm = value_loss(values, mb['values'], mb['returns'], m, cfg.value_clip)
  entropy = losses.masked_mean(ent, m)
  loss = pg + cfg.vf_coef * vl - cfg.ent_coef * entropy
  aux = {'ppo/policy_loss': pg, 'ppo/value_loss': vl, 'ppo/entropy': entropy,
         'ppo/policy_clipfrac': pm['clipfrac'], 'ppo/value_clipfrac': vm['clipfrac'],
         'ppo/approx_kl': pm['approx_kl']}
  if ptx is not None:
    nll, n = ptx_nll_sum(params['policy'], ptx, models=models)
    ptx_loss = nll / jnp.maximum(n, 1)
    loss = loss + cfg.ptx_coef * ptx_loss
    aux['ppo/ptx_loss'] = ptx_loss
  aux['ppo/loss'] = loss
  return loss, aux


def ptx_nll_sum(policy_params, rows, *, models: Models):
  """(summed NLL of the pretraining rows' scored tokens, their number): the PPO-ptx term is
  their ratio, the per-token mean."""
  h = models.policy.apply({'params': policy_params}, rows['tokens'], rows['positions'], rows['mask'],
                          segments=rows.get('segments'), method='trunk')[0]
  logits = models.policy.apply({'params': policy_params}, h, method='logits')
  targets, mask = losses.next_token_targets(rows['tokens'], rows['loss_mask'])
  return -(losses.token_logprobs(logits, targets) * mask).sum(), mask.sum()


def ptx_gradient(policy_params, ptx, *, models: Models, cfg: PPOConfig):
  """(γ · gradient of the per-token mean pretraining NLL of `ptx`, that mean), accumulated over
  `cfg.ptx_microbatches` chunks of its rows: only one chunk's activations are alive at a time."""
  k = cfg.ptx_microbatches
  if ptx['tokens'].shape[0] % k:
    raise ValueError(f"{ptx['tokens'].shape[0]} pretraining rows per minibatch do not split into "
                     f'ppo.ptx_microbatches={k}')
  chunks = jax.tree.map(lambda a: a.reshape(k, a.shape[0] // k, *a.shape[1:]), ptx)   # [k, R / k, T]

  def body(carry, rows):
    g_sum, nll, n = carry
    (s, count), g = jax.value_and_grad(lambda p: ptx_nll_sum(p, rows, models=models), has_aux=True)(policy_params)
    return (jax.tree.map(jnp.add, g_sum, g), nll + s, n + count), None

  zero = jax.tree.map(jnp.zeros_like, policy_params)
  (g_sum, nll, n), _ = jax.lax.scan(body, (zero, jnp.zeros(()), jnp.zeros(())), chunks)
  n = jnp.maximum(n, 1)
  return jax.tree.map(lambda g: cfg.ptx_coef * g / n, g_sum), nll / n


def minibatch_step(state: PPOState, mb, ptx, *, models: Models, cfg: PPOConfig, tx):
  """One optimizer step on one minibatch (and its pretraining minibatch): the unit that `update`
  scans over. A non-finite loss or gradient leaves params, optimizer and EMA unchanged and
  records the iteration in `bad_step`."""
  accumulate = ptx is not None and cfg.ptx_microbatches > 1
  (loss, aux), grads = jax.value_and_grad(minibatch_loss, has_aux=True)(
      state.params, mb, None if accumulate else ptx, models=models, cfg=cfg)
  if accumulate:
    g_ptx, ptx_loss = ptx_gradient(state.params['policy'], ptx, models=models, cfg=cfg)
    grads = dict(grads, policy=jax.tree.map(jnp.add, grads['policy'], g_ptx))
    loss = loss + cfg.ptx_coef * ptx_loss
    aux.update({'ppo/ptx_loss': ptx_loss, 'ppo/loss': loss})
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  params, opt_state = state_lib.apply_if_finite(state.params, state.opt_state, grads, tx, finite)
  ema = state.ema
  if cfg.ema_decay:
    new_ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1 - cfg.ema_decay) * p, ema, params['policy'])
    ema = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_ema, ema)
  bad = jnp.where(finite | (state.bad_step >= 0), state.bad_step, state.step)
  aux['ppo/grad_norm'] = grad_norm
  return state.replace(params=params, opt_state=opt_state, ema=ema, bad_step=bad), aux


def permutations(key, epochs: int, n: int):
  """The update's minibatch order: a fresh permutation of the n episodes per epoch [epochs, n]."""
  return jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, epochs))


def update(state: PPOState, rollouts, ptx=None, *, models: Models, cfg: PPOConfig, tx):
  """All PPO epochs and minibatches of one iteration in one scan, then the KL controller and the
  step. rollouts: `score`'s; ptx (PPO-ptx): pretraining rows [epochs · minibatches · R, T], R per
  minibatch. Returns (state, metrics averaged over the minibatches)."""
  B = rollouts['response'].shape[0]
  if B % cfg.minibatches:
    raise ValueError(f'{B} episodes do not split into ppo.minibatches={cfg.minibatches}')
  mbs = cfg.minibatches
  perm = permutations(state.key(1), cfg.epochs, B).reshape(cfg.epochs * mbs, B // mbs)
  xs = {'idx': perm}
  if ptx is not None:
    n = cfg.epochs * mbs
    xs['ptx'] = jax.tree.map(lambda a: a.reshape(n, a.shape[0] // n, *a.shape[1:]), ptx)

  def body(st, x):
    mb = jax.tree.map(lambda a: a[x['idx']], rollouts)
    return minibatch_step(st, mb, x.get('ptx'), models=models, cfg=cfg, tx=tx)

  state, aux = jax.lax.scan(body, state, xs)
  m = jax.tree.map(jnp.mean, aux)
  kl_coef = state.kl_coef
  if cfg.adaptive_kl:  # after the update, from this batch's KL (the rewards used the old β)
    kl_coef = kl_controller(kl_coef, rollouts['kl'].mean(), B, target=cfg.kl_target, horizon=cfg.kl_horizon)
  return state.replace(step=state.step + 1, kl_coef=kl_coef), m
