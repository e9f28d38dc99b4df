//! Adam on the flat parameter vector. The optimiser works on plain `Vec<f32>` rather than
//! candle `Var`s because the gradient arrives as one all-reduced flat buffer; it costs three
//! passes over the parameters per step and keeps its state (m, v, t) checkpointable.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// L2 penalty added to the gradient (classic Adam weight decay; 0 = off).
    pub weight_decay: f64,
}

/// Adam (Kingma & Ba) with bias correction.
#[derive(Clone, Debug)]
pub struct Adam {
    pub cfg: AdamConfig,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Steps taken.
    pub t: u64,
}

impl Adam {
    pub fn new(cfg: AdamConfig, n: usize) -> Self {
        Self {
            cfg,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// One update of `params` with the (already averaged) gradient `grads`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32]) {
        assert_eq!(params.len(), grads.len());
        assert_eq!(params.len(), self.m.len());
        self.t += 1;
        let c = &self.cfg;
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        // Folding the bias corrections into the step size: lr_t = lr * sqrt(bc2) / bc1, with eps
        // scaled accordingly so the update equals the textbook m_hat / (sqrt(v_hat) + eps).
        let step = (c.lr * bc2.sqrt() / bc1) as f32;
        let eps = (c.eps * bc2.sqrt()) as f32;
        let wd = c.weight_decay as f32;
        for i in 0..params.len() {
            let g = grads[i] + wd * params[i];
            let m = b1 * self.m[i] + (1.0 - b1) * g;
            let v = b2 * self.v[i] + (1.0 - b2) * g * g;
            self.m[i] = m;
            self.v[i] = v;
            params[i] -= step * m / (v.sqrt() + eps);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_coordinate_by_lr() {
        // With bias correction the first Adam step is lr * sign(g) (up to eps).
        let cfg = AdamConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut a = Adam::new(cfg, 3);
        let mut p = vec![1.0, 1.0, 1.0];
        a.step(&mut p, &[0.5, -2.0, 0.0]);
        assert!(
            (p[0] - 0.9).abs() < 1e-6 && (p[1] - 1.1).abs() < 1e-6 && p[2] == 1.0,
            "{p:?}"
        );
    }

    #[test]
    fn minimises_a_quadratic() {
        let cfg = AdamConfig {
            lr: 0.05,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut a = Adam::new(cfg, 2);
        let mut p = vec![3.0f32, -2.0];
        for _ in 0..500 {
            let g: Vec<f32> = p.iter().map(|x| 2.0 * (x - 1.0)).collect();
            a.step(&mut p, &g);
        }
        assert!(p.iter().all(|x| (x - 1.0).abs() < 1e-2), "{p:?}");
    }
}
