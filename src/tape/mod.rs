//! The host-side autograd tape.
//!
//! A forward pass on [`Var`]s records, for every op whose inputs need a gradient, one [`Node`]: the ids of its
//! inputs and a closure that owns exactly what the op's backward kernel reads (saved activations and
//! statistics). [`Tape::backward`] walks the nodes in reverse, calls each closure with the gradient of its
//! output, sums gradients where a value fed several ops, and drops each node as soon as it ran, which frees
//! its saved activations. Parameter gradients accumulate into their [`Param`] (`+=`, cleared by
//! [`Param::zero_grad`]), so several backward passes can add up before an optimizer step.
//!
//! Kernels never see the tape; the tape never runs inside a kernel. A tape made with [`Tape::no_grad`]
//! records nothing, and ops then pick their fused inference kernels (conv + GELU, linear + GELU).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};

use crate::gpu::Tensor;
use crate::ops::elementwise;

mod ops;

/// A trainable tensor with its gradient slot.
pub struct Param {
    pub name: String,
    value: Tensor,
    grad: Mutex<Option<Tensor>>,
}

impl Param {
    pub fn new(name: impl Into<String>, value: Tensor) -> Arc<Param> {
        Arc::new(Param {
            name: name.into(),
            value,
            grad: Mutex::new(None),
        })
    }

    /// The current value. Optimizers update it in place on the GPU.
    pub fn value(&self) -> &Tensor {
        &self.value
    }

    /// The accumulated gradient, if any backward pass reached this parameter since the last zero_grad.
    pub fn grad(&self) -> Option<Tensor> {
        self.grad.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn zero_grad(&self) {
        *self.grad.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn accumulate(&self, g: Tensor) -> Result<()> {
        if g.shape() != self.value.shape() {
            bail!(
                "gradient of {} has shape {:?}, the parameter {:?}",
                self.name,
                g.shape(),
                self.value.shape()
            );
        }
        let mut slot = self.grad.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(match slot.take() {
            None => g,
            Some(acc) => elementwise::add(&acc, &g)?,
        });
        Ok(())
    }
}

/// A value in a forward pass: a tensor, plus its identity on the tape when it needs a gradient.
#[derive(Clone)]
pub struct Var {
    value: Tensor,
    /// Tape id, `None` for values no gradient flows to (constants, no-grad runs).
    id: Option<usize>,
}

impl Var {
    pub fn value(&self) -> &Tensor {
        &self.value
    }

    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }

    pub fn needs_grad(&self) -> bool {
        self.id.is_some()
    }
}

type BackwardFn = Box<dyn FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>>>;

struct Node {
    output: usize,
    inputs: Vec<Option<usize>>,
    backward: BackwardFn,
}

#[derive(Default)]
struct Recording {
    nodes: Vec<Node>,
    next_id: usize,
    params: HashMap<usize, Arc<Param>>,
}

/// The tape. Single-threaded (one forward/backward at a time); cheap to create per step.
pub struct Tape {
    recording: Option<RefCell<Recording>>,
    /// Seeds dropout masks: every dropout site draws its own Philox stream under this key, so a step's
    /// masks are reproducible from the step's seed (a resumed run gives the same losses).
    seed: u64,
    dropout_calls: std::cell::Cell<u64>,
}

impl Tape {
    /// A tape that records for backward.
    pub fn new() -> Tape {
        Tape::with_seed(0)
    }

    /// A recording tape whose dropout masks derive from `seed` (one seed per training step).
    pub fn with_seed(seed: u64) -> Tape {
        Tape {
            recording: Some(RefCell::default()),
            seed,
            dropout_calls: Default::default(),
        }
    }

    /// A tape that records nothing: inference and the teacher.
    pub fn no_grad() -> Tape {
        Tape {
            recording: None,
            seed: 0,
            dropout_calls: Default::default(),
        }
    }

    pub fn is_recording(&self) -> bool {
        self.recording.is_some()
    }

    fn fresh_id(&self) -> Option<usize> {
        self.recording.as_ref().map(|r| {
            let mut r = r.borrow_mut();
            r.next_id += 1;
            r.next_id
        })
    }

    /// A value that needs no gradient (inputs, targets, frozen weights).
    pub fn constant(&self, value: Tensor) -> Var {
        Var { value, id: None }
    }

    /// A parameter: its gradient accumulates into `param` on backward (when recording).
    pub fn param(&self, param: &Arc<Param>) -> Var {
        let id = self.fresh_id();
        if let (Some(id), Some(r)) = (id, &self.recording) {
            r.borrow_mut().params.insert(id, param.clone());
        }
        Var {
            value: param.value().clone(),
            id,
        }
    }

    /// Records an op: `value` is its output; `backward` maps the output's gradient to one optional gradient
    /// per input (in order). Nothing is recorded, and `backward` is dropped unused, when no input needs a
    /// gradient or the tape is not recording.
    pub fn push(
        &self,
        value: Tensor,
        inputs: &[&Var],
        backward: impl FnOnce(&Tensor) -> Result<Vec<Option<Tensor>>> + 'static,
    ) -> Var {
        let Some(rec) = &self.recording else {
            return Var { value, id: None };
        };
        if inputs.iter().all(|v| v.id.is_none()) {
            return Var { value, id: None };
        }
        let id = self.fresh_id().expect("recording");
        rec.borrow_mut().nodes.push(Node {
            output: id,
            inputs: inputs.iter().map(|v| v.id).collect(),
            backward: Box::new(backward),
        });
        Var { value, id: Some(id) }
    }

    /// Back-propagates from `loss` (a one-element tensor, seeded with gradient 1), accumulating into every
    /// parameter it reaches. Consumes the recording: the tape is empty afterwards.
    pub fn backward(&self, loss: &Var) -> Result<()> {
        let Some(rec) = &self.recording else {
            bail!("backward on a no-grad tape")
        };
        let Some(loss_id) = loss.id else {
            bail!("backward: the loss does not depend on any parameter")
        };
        if loss.value.numel() != 1 {
            bail!(
                "backward: the loss must be a single value, got shape {:?}",
                loss.value.shape()
            );
        }
        let Recording { nodes, params, .. } = std::mem::take(&mut *rec.borrow_mut());
        let seed = Tensor::empty(loss.value.gpu(), loss.value.shape(), crate::gpu::DType::F32)?;
        seed.fill(1.0)?;
        let mut grads: HashMap<usize, Tensor> = HashMap::from([(loss_id, seed)]);
        let deliver = |id: usize, g: Tensor, grads: &mut HashMap<usize, Tensor>| -> Result<()> {
            if let Some(p) = params.get(&id) {
                return p.accumulate(g);
            }
            let summed = match grads.remove(&id) {
                None => g,
                Some(acc) => elementwise::add(&acc, &g)?,
            };
            grads.insert(id, summed);
            Ok(())
        };
        // Nodes are in creation order, which is a topological order: walking it backwards sees every
        // consumer of a value before the value's producer.
        for node in nodes.into_iter().rev() {
            let Some(g) = grads.remove(&node.output) else { continue };
            let input_grads = (node.backward)(&g)?;
            if input_grads.len() != node.inputs.len() {
                bail!(
                    "internal: a backward returned {} gradients for {} inputs",
                    input_grads.len(),
                    node.inputs.len()
                );
            }
            for (input, grad) in node.inputs.iter().zip(input_grads) {
                if let (Some(id), Some(grad)) = (input, grad) {
                    deliver(*id, grad, &mut grads)?;
                }
            }
        }
        Ok(())
    }
}

impl Default for Tape {
    fn default() -> Self {
        Tape::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_gpu;

    #[test]
    fn add_grad_sums_over_every_use_and_accumulates_into_params() {
        // loss = sum-free scalar case: y = (a + a) + b with one-element tensors; dy/da = 2, dy/db = 1.
        let gpu = test_gpu();
        let a = Param::new("a", Tensor::from_slice(gpu, &[3.0], &[1]).unwrap());
        let b = Param::new("b", Tensor::from_slice(gpu, &[4.0], &[1]).unwrap());
        for round in 1..=2 {
            let tape = Tape::new();
            let (va, vb) = (tape.param(&a), tape.param(&b));
            let y = tape.add(&tape.add(&va, &va).unwrap(), &vb).unwrap();
            assert_eq!(y.value().to_vec().unwrap(), vec![10.0]);
            tape.backward(&y).unwrap();
            // Gradients accumulate across backward passes until zero_grad.
            assert_eq!(a.grad().unwrap().to_vec().unwrap(), vec![2.0 * round as f32]);
            assert_eq!(b.grad().unwrap().to_vec().unwrap(), vec![round as f32]);
        }
        a.zero_grad();
        assert!(a.grad().is_none());
    }

    #[test]
    fn no_grad_tape_records_nothing() {
        let gpu = test_gpu();
        let a = Param::new("a", Tensor::from_slice(gpu, &[1.0], &[1]).unwrap());
        let tape = Tape::no_grad();
        let y = tape.add(&tape.param(&a), &tape.param(&a)).unwrap();
        assert!(!y.needs_grad());
        assert!(tape.backward(&y).is_err());
    }
}
