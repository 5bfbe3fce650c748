// f, f' and f'' of the activations of jet_activation, shared by the CPU and
// CUDA kernels so that both evaluate the same closed forms, in the same order
// of operations as symfast/reference.py (_activation_derivatives).
//
// Sigmoids appear as the pair sigma(x), sigma(-x) rather than sigma and
// 1 - sigma: sigma' = sigma(x) sigma(-x) then stays accurate in both tails,
// where 1 - sigma(x) would cancel to 0; likewise 1 - tanh^2 (sech2_of).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace symfast {

enum class Activation : int { kGelu, kGeluTanh, kSilu, kTanh, kSigmoid, kRelu, kSoftplus };

// The kind strings of the schema, in the order of the enum.
constexpr const char* kActivationNames[] = {"gelu", "gelu_tanh", "silu", "tanh",
                                            "sigmoid", "relu", "softplus"};
constexpr int kNumActivations = 7;

template <typename acc_t>
struct Derivatives {
  acc_t f, d1, d2;
};

template <typename acc_t>
C10_HOST_DEVICE inline acc_t sigmoid_of(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

// 1 - tanh(x)^2 as 4 sigma(2x) sigma(-2x): accurate where tanh(x) rounds to
// +-1 and 1 - tanh^2 would cancel to 0.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sech2_of(acc_t x) {
  return acc_t(4) * sigmoid_of(acc_t(2) * x) * sigmoid_of(acc_t(-2) * x);
}

// beta and threshold are read by softplus only.
template <Activation A, typename acc_t>
C10_HOST_DEVICE inline Derivatives<acc_t> activation_derivatives(acc_t x, acc_t beta,
                                                                 acc_t threshold) {
  constexpr double kSqrt1_2 = 0.7071067811865476;      // 1/sqrt(2)
  constexpr double kInvSqrt2Pi = 0.3989422804014327;   // 1/sqrt(2 pi)
  constexpr double kTanhC = 0.7978845608028654;        // sqrt(2/pi)
  constexpr double kTanhA = 0.044715;
  if constexpr (A == Activation::kGelu) {
    const acc_t cdf = acc_t(0.5) * std::erfc(-x * acc_t(kSqrt1_2));  // 1 + erf cancels for x << 0
    const acc_t pdf = std::exp(acc_t(-0.5) * (x * x)) * acc_t(kInvSqrt2Pi);
    return {x * cdf, cdf + x * pdf, pdf * (acc_t(2) - x * x)};
  } else if constexpr (A == Activation::kGeluTanh) {
    // (1 + tanh(u)) / 2 = sigma(2u), which does not cancel for x << 0
    const acc_t u = acc_t(kTanhC) * (x + acc_t(kTanhA) * (x * x * x));
    const acc_t half_1pt = sigmoid_of(acc_t(2) * u), t = std::tanh(u), sech2 = sech2_of(u);
    const acc_t du = acc_t(kTanhC) * (acc_t(1) + acc_t(3 * kTanhA) * (x * x));
    const acc_t ddu = acc_t(kTanhC * 6 * kTanhA) * x;
    const acc_t half_x = acc_t(0.5) * x;
    return {x * half_1pt, half_1pt + half_x * sech2 * du,
            sech2 * (du + half_x * (ddu - acc_t(2) * t * du * du))};
  } else if constexpr (A == Activation::kSilu || A == Activation::kSigmoid) {
    const acc_t sp = sigmoid_of(x), sm = sigmoid_of(-x);
    if constexpr (A == Activation::kSigmoid) {
      return {sp, sp * sm, sp * sm * (sm - sp)};
    } else {
      return {x * sp, sp * (acc_t(1) + x * sm), sp * sm * (acc_t(2) + x * (sm - sp))};
    }
  } else if constexpr (A == Activation::kTanh) {
    const acc_t t = std::tanh(x), sech2 = sech2_of(x);
    return {t, sech2, acc_t(-2) * t * sech2};
  } else if constexpr (A == Activation::kRelu) {
    // f'(0) = 0 as in torch's relu backward; NaN passes through like torch.relu.
    const bool on = x > acc_t(0);
    return {(on || x != x) ? x : acc_t(0), on ? acc_t(1) : acc_t(0), acc_t(0)};
  } else {  // softplus, linear where beta x > threshold (torch.nn.functional.softplus)
    const acc_t bx = x * beta;
    if (bx > threshold) return {x, acc_t(1), acc_t(0)};
    const acc_t sp = sigmoid_of(bx), sm = sigmoid_of(-bx);
    return {std::log1p(std::exp(bx)) / beta, sp, beta * sp * sm};
  }
}

// Calls fn(std::integral_constant<Activation, A>{}) for the runtime kind
// `act`, so that each kernel is compiled once per activation.
template <typename Fn>
inline void activation_switch(Activation act, const Fn& fn) {
  switch (act) {
    case Activation::kGelu: return fn(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh: return fn(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kSilu: return fn(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kTanh: return fn(std::integral_constant<Activation, Activation::kTanh>{});
    case Activation::kSigmoid: return fn(std::integral_constant<Activation, Activation::kSigmoid>{});
    case Activation::kRelu: return fn(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kSoftplus: return fn(std::integral_constant<Activation, Activation::kSoftplus>{});
  }
}

}  // namespace symfast
