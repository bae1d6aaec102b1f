// CUDA implementation of cem::attention_bwd: reverse over the steps, the epilogue backward and
// the dense products through ATen/cuBLAS, the attention core's backward through the tile kernels
// (recomputing probabilities from the saved iterates and log-sum-exp), docs/backward.md order.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <climits>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/attention_setup.h"
#include "ops/autocast_off.h"
#include "ops/saved_state.h"

namespace cem::cuda {
namespace {

using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, OptTensor, OptTensor, OptTensor, at::Tensor>;

at::Tensor precondition(const at::Tensor& g, const at::Tensor& p_diag, const at::Tensor& u) {
  auto out = p_diag.defined() ? g * p_diag : g;
  if (u.defined()) {
    out = out + at::mm(at::mm(g, u), u.t());
  }
  return out;
}

// Accumulators of the backward pass (float32).
struct Grads {
  at::Tensor a;        // (B N, D): gradient of the current iterate
  at::Tensor dk;       // (B, N, H, Dh): dL/dK, over all steps
  at::Tensor wq;       // (H Dh, D)
  at::Tensor diag_f;   // shared: F = sum (beta dS^T x + P^T dG), (B, N, D); per head: sum_k lambda_k F^k
  at::Tensor diag;     // dL/dlambda, (D,) or (H, D)
};

// What the D-wide terms of every step and panel share, computed once per call.
struct DiagTerms {
  at::Tensor scaled_context;  // beta lambda * c, input dtype (a shared diagonal): dx += dS (beta lambda * c)
  at::Tensor context_f;       // c in float32 (a per-head diagonal's d lambda)
};

// Backward of one step's attention core given dG; adds into g.a (scores' direct dx), g.dk,
// g.diag_f, g.diag; leaves dq (B, N, H, Dh) for this step. `first_step`: the first step the
// backward handles, where every dK row gets its first contribution (written, not accumulated).
void backward_core(
    const Setup& st, const PanelWorkspace& panels, const DiagTerms& terms, const at::Tensor& x_t, const at::Tensor& q,
    const at::Tensor& o, const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& grad_g_t,
    const at::Tensor& grad_g, at::Tensor& delta, at::Tensor& dq, Grads& g, bool first_step) {
  const auto& s = st.s;
  auto p = base_params(st, q, o, lse);
  p.dout = head_view(dout, s);
  p.vec_loads = p.vec_loads && aligned16(dout);
  p.delta = delta.data_ptr<float>();
  p.dq = head_view(dq, s);
  p.dk = head_view(g.dk, s);
  p.dq_atomic = st.dq_atomic();
  if (p.dq_atomic) {
    dq.zero_();
  }
  auto run = [&](int64_t r0) {
    p.dk_overwrite_from = first_step ? static_cast<int>(r0) : INT_MAX;
    check_launch(st, st.kernels->bwd_delta(p, st.stream), "attention_bwd_delta");
    check_launch(st, st.kernels->bwd(p, st.stream), "attention_bwd");
    if (!p.dq_atomic && st.kernels->bwd_dq != nullptr) {
      check_launch(st, st.kernels->bwd_dq(p, st.stream), "attention_bwd_dq");
    }
  };
  if (!st.has_diag()) {
    run(0);
    return;
  }
  const auto grad_g_3d = grad_g.view({s.batch, s.seq, s.dim});
  const auto grad_g_t_3d = grad_g_t.view({s.batch, s.seq, s.dim});
  auto a_3d = g.a.view({s.batch, s.seq, s.dim});
  for (int64_t r0 = 0; r0 < s.seq; r0 += st.panel_rows) {
    const int64_t r1 = std::min(s.seq, r0 + st.panel_rows);
    const int64_t rows = r1 - r0, keys = r1;
    const auto x_rows = x_t.narrow(1, r0, rows);
    const auto score_bias = panels.view(0, rows, keys, st.per_head());
    const auto dp_bias = panels.view(1, rows, keys, st.per_head());
    diag_products(st, score_bias, x_rows, st.beta, keys);
    diag_products(st, dp_bias, grad_g_3d.narrow(1, r0, rows), 1.0, keys);  // y_i . c_j
    const auto probs = panels.view(2, rows, keys, st.head_panels()).zero_();
    const auto dprobs = panels.view(3, rows, keys, st.head_panels()).zero_();
    p.row_begin = static_cast<int>(r0);
    p.row_end = static_cast<int>(r1);
    p.score_bias = panel_view(score_bias, st.per_head());
    p.dp_bias = panel_view(dp_bias, st.per_head());
    p.probs = panel_view(probs, st.head_panels());
    p.dprobs = panel_view(dprobs, st.head_panels());
    p.probs_per_head = st.head_panels();
    run(r0);

    // D-wide terms (docs/backward.md step 4), added straight into their float32 destinations.
    const auto context = st.x.narrow(1, 0, keys);
    const auto grad_g_rows = grad_g_t_3d.narrow(1, r0, rows);
    const auto p_rows = panel_operand(st, probs);
    const auto ds_rows = panel_operand(st, dprobs);
    auto a_rows = a_3d.narrow(1, r0, rows);
    auto diag_f_keys = g.diag_f.narrow(1, 0, keys);
    if (!st.per_head()) {
      add_bmm_f32(a_rows, ds_rows, terms.scaled_context.narrow(1, 0, keys));  // dx += beta lambda * (dS c)
      add_bmm_f32(diag_f_keys, ds_rows.transpose(1, 2), x_rows, st.beta);       // F += beta dS^T x + P^T dG
      add_bmm_f32(diag_f_keys, p_rows.transpose(1, 2), grad_g_rows);
      continue;
    }
    const auto context_f = terms.context_f.narrow(1, 0, keys);
    for (int64_t k = 0; k < s.heads; ++k) {
      const auto lam_k = st.lam.select(0, k);
      const auto ds_k = ds_rows.select(1, k);
      const auto p_k = p_rows.select(1, k);
      a_rows.add_(bmm_f32(ds_k, context).mul_(lam_k * st.beta));
      auto f_k = bmm_f32(ds_k.transpose(1, 2), x_rows).mul_(st.beta);
      add_bmm_f32(f_k, p_k.transpose(1, 2), grad_g_rows);
      diag_f_keys.add_(f_k * lam_k);
      g.diag.select(0, k).add_((f_k * context_f).sum({0, 1}));
    }
  }
}

BwdResult attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_k,
    const OptTensor& diag, const OptTensor& alibi_slopes, const OptTensor& precond_diag,
    const OptTensor& precond_lowrank, const at::Tensor& step_size, std::optional<double> scale,
    const at::Tensor& iterates, const at::Tensor& head_outputs, const at::Tensor& diag_values, const at::Tensor& lse) {
  const AutocastOff autocast_off;
  constexpr const char* kOp = "cem::attention_bwd";
  const auto s = check_attention_args(kOp, x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale);
  check_attention_state(kOp, s, x, grad_out, iterates, head_outputs, diag_values, lse);
  std::string why;
  const auto* kernels = select_kernels(x.scalar_type(), s.head_dim, &why);
  if (kernels == nullptr) {
    warn_fallback(kOp, why, x.scalar_type());
    auto out = call_reference(
        kOp, grad_out, x, w_q, w_k, diag, alibi_slopes, precond_diag, precond_lowrank, step_size, scale, iterates,
        head_outputs, diag_values, lse);
    auto opt = [&](size_t i) { return out[i].isNone() ? OptTensor() : OptTensor(out[i].toTensor()); };
    return {out[0].toTensor(), out[1].toTensor(), out[2].toTensor(), opt(3), opt(4), opt(5), out[6].toTensor()};
  }
  check_launch_limits(kOp, s);

  const DeviceGuard guard(x.device());
  const auto dtype = x.scalar_type();
  const auto f32 = x.options().dtype(at::kFloat);
  auto grad_wq = at::zeros({s.heads * s.head_dim, s.dim}, f32);
  auto grad_eta = at::zeros({s.steps}, f32);
  auto grad_p_diag = precond_diag.has_value() ? at::zeros({s.dim}, f32) : at::Tensor();
  auto grad_u = precond_lowrank.has_value() ? at::zeros({s.dim, s.rank}, f32) : at::Tensor();
  auto grad_lam = diag.has_value() ? at::zeros(diag->sizes(), f32) : at::Tensor();
  auto finish = [&](const at::Tensor& grad_x, const at::Tensor& grad_wk) -> BwdResult {
    auto opt = [&](const at::Tensor& t) { return t.defined() ? OptTensor(t.to(dtype)) : OptTensor(); };
    return {grad_x.to(dtype), grad_wq.view({s.heads, s.head_dim, s.dim}).to(dtype),
            grad_wk.view({s.heads, s.head_dim, s.dim}).to(dtype), opt(grad_lam), opt(grad_p_diag), opt(grad_u),
            grad_eta.to(dtype)};
  };
  if (s.batch == 0 || s.seq == 0) {
    return finish(at::zeros({s.batch, s.seq, s.dim}, f32), at::zeros({s.heads * s.head_dim, s.dim}, f32));
  }
  check_device_smem(kOp, *kernels);
  const Setup st = make_setup(s, kernels, x, w_q, w_k, diag, alibi_slopes, scale);
  const int64_t rows = s.batch * s.seq, hd = s.heads * s.head_dim;

  const auto eta = step_size.to(at::kFloat);
  const auto p_diag = precond_diag.has_value() ? precond_diag->to(at::kFloat) : at::Tensor();
  const auto u = precond_lowrank.has_value() ? precond_lowrank->to(at::kFloat) : at::Tensor();
  const auto grad_out_f = grad_out.to(at::kFloat).reshape({rows, s.dim});

  Grads g;
  g.a = grad_out_f.clone(at::MemoryFormat::Contiguous);  // a = dY: x^T enters Delta with sign +1
  g.dk = at::empty({s.batch, s.seq, s.heads, s.head_dim}, f32);  // the first step writes every row
  g.wq = grad_wq;
  g.diag_f = st.has_diag() ? at::zeros({s.batch, s.seq, s.dim}, f32) : at::Tensor();
  g.diag = grad_lam;
  auto dq = at::empty({s.batch, s.seq, s.heads, s.head_dim}, f32);
  auto delta = at::empty({s.batch, s.heads, s.seq}, f32);
  const PanelWorkspace panels(st, st.has_diag() ? 4 : 0);
  DiagTerms terms;
  if (st.has_diag()) {
    if (st.per_head()) {
      terms.context_f = st.x.to(at::kFloat);
    } else {
      terms.scaled_context = (st.x.to(at::kFloat) * (st.lam * st.beta)).to(dtype);
    }
  }

  for (int64_t t = s.steps - 1; t >= 0; --t) {
    const auto x_t = t == 0 ? st.x : iterates.select(0, t - 1).contiguous();
    const auto x_t_2d = x_t.view({rows, s.dim});
    const auto o = head_outputs.select(0, t).contiguous();
    const auto o_2d = o.view({rows, hd});

    // Epilogue backward: x^{t+1} = x^t + eta_t P G^t.
    auto neg_grad = mm_f32(o_2d, st.wq);
    if (st.has_diag()) {
      neg_grad.add_(diag_values.select(0, t).reshape({rows, s.dim}));
    }
    grad_eta.select(0, t).copy_((g.a * precondition(neg_grad, p_diag, u)).sum());
    const auto scaled_a = g.a * eta.select(0, t);
    const auto grad_g = precondition(scaled_a, p_diag, u);  // P is symmetric
    if (p_diag.defined()) {
      grad_p_diag.add_((scaled_a * neg_grad).sum(0));
    }
    if (u.defined()) {
      grad_u.add_(at::mm(scaled_a.t(), at::mm(neg_grad, u))).add_(at::mm(neg_grad.t(), at::mm(scaled_a, u)));
    }

    // Value side: G = W_Q^T o + ..., so do = W_Q dG and dW_Q += o^T dG.
    const auto grad_g_t = grad_g.to(dtype);
    const auto dout = at::mm(grad_g_t, st.wq.t());  // (B N, H Dh)
    grad_wq.add_(mm_f32(o_2d.t(), grad_g_t));
    const auto q = at::mm(x_t_2d, st.wq.t());

    backward_core(st, panels, terms, x_t, q, o, dout, lse.select(0, t).contiguous(), grad_g_t, grad_g, delta, dq, g,
                  t == s.steps - 1);

    // Query side: q = W_Q x^t.
    const auto dq_t = dq.view({rows, hd}).to(dtype);
    grad_wq.add_(mm_f32(dq_t.t(), x_t_2d));
    g.a.add_(mm_f32(dq_t, st.wq));
  }

  // Keys and context never moved: dW_K = dK^T c, dc = W_K^T dK (+ diagonal terms).
  const auto dk_t = g.dk.view({rows, hd}).to(dtype);
  const auto grad_wk = mm_f32(dk_t.t(), st.x.view({rows, s.dim}));
  auto grad_x = g.a + mm_f32(dk_t, st.wk) - grad_out_f;
  if (st.has_diag()) {
    const auto diag_f = g.diag_f.view({rows, s.dim});
    if (st.per_head()) {
      grad_x.add_(diag_f);  // already sum_k lambda_k F^k, and d lambda accumulated per panel
    } else {
      grad_x.add_(diag_f * st.lam);
      grad_lam.add_((diag_f * st.x.view({rows, s.dim}).to(at::kFloat)).sum(0));
    }
  }
  return finish(grad_x.view({s.batch, s.seq, s.dim}), grad_wk);
}

}  // namespace

CEM_CUDA_LIBRARY_IMPL(m) { m.impl("attention_bwd", &attention_bwd_cuda); }

}  // namespace cem::cuda
