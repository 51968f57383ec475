//! The GeneCIS Combiner head (models/combiner_model.py): text and image
//! projections, a combiner layer and a dynamic scalar that mixes the
//! residual text and image features.

use std::collections::HashMap;
use std::path::PathBuf;

use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use super::{linear, Result, StateDict};
use crate::rng::Rng;

/// How the training forward pass draws its Dropout(0.5) masks.
pub enum Dropout<'a> {
    /// Eval mode.
    Off,
    /// One row per sample from [`Combiner::sample_masks`].
    Masks(&'a [Tensor; 4]),
}

/// The original's layer sizes: `Combiner(d, 2560, 2 * 2560)`.
pub(crate) const PROJECTION_DIM: i64 = 2560;
pub(crate) const HIDDEN_DIM: i64 = 2 * 2560;

/// Linear layers in the module's registration order (its state dict's).
const LAYERS: [&str; 5] = [
    "text_projection_layer",
    "image_projection_layer",
    "combiner_layer",
    "output_layer",
    "dynamic_scalar.0",
];

pub struct Combiner {
    w: StateDict,
    pub dim: i64,
}

impl Combiner {
    /// From a `*_combiner_head.pt` state dict (or any of the formats
    /// [`StateDict::load`] reads).
    pub fn new(w: StateDict) -> Result<Combiner> {
        w.ensure_finite()?;
        let tp = w.get_shaped("text_projection_layer.weight", &[-1, -1])?;
        let (proj, dim) = (tp.size()[0], tp.size()[1]);
        let _ = w.get_shaped("image_projection_layer.weight", &[proj, dim])?;
        let c = w.get_shaped("combiner_layer.weight", &[-1, 2 * proj])?;
        let hidden = c.size()[0];
        let _ = w.get_shaped("output_layer.weight", &[dim, hidden])?;
        let _ = w.get_shaped("dynamic_scalar.0.weight", &[hidden, 2 * proj])?;
        let _ = w.get_shaped("dynamic_scalar.3.weight", &[1, hidden])?;
        Ok(Combiner { w, dim })
    }

    fn lin(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        let b = self.w.get(&format!("{name}.bias"))?;
        Ok(linear(x, &self.w.get(&format!("{name}.weight"))?, Some(&b)))
    }

    /// A freshly initialised head, drawn as `nn.Linear`'s default init
    /// draws it, layer by layer, from libtorch's generator: after
    /// `tch::manual_seed(s)` on CPU it equals `torch.manual_seed(s);
    /// Combiner(...)`.
    pub fn init(dim: i64, projection: i64, hidden: i64, device: Device) -> Result<Combiner> {
        let shapes = [
            ("text_projection_layer", projection, dim),
            ("image_projection_layer", projection, dim),
            ("combiner_layer", hidden, 2 * projection),
            ("output_layer", dim, hidden),
            ("dynamic_scalar.0", hidden, 2 * projection),
            ("dynamic_scalar.3", 1, hidden),
        ];
        let mut tensors = HashMap::new();
        // kaiming_uniform_(a=sqrt(5)) computed as torch.nn.init does.
        let a2 = 5f64.sqrt().powi(2);
        for (name, out, fan_in) in shapes {
            let fan = fan_in as f64;
            let w_bound = 3f64.sqrt() * ((2.0 / (1.0 + a2)).sqrt() / fan.sqrt());
            let b_bound = 1.0 / fan.sqrt();
            let opts = (Kind::Float, device);
            let w = Tensor::f_empty([out, fan_in], opts)?.f_uniform_(-w_bound, w_bound)?;
            let b = Tensor::f_empty([out], opts)?.f_uniform_(-b_bound, b_bound)?;
            tensors.insert(format!("{name}.weight"), w);
            tensors.insert(format!("{name}.bias"), b);
        }
        Combiner::new(StateDict {
            path: PathBuf::from("<initialised Combiner>"),
            tensors,
        })
    }

    /// Parameter names in the order `Combiner.state_dict()` lists them.
    pub fn names() -> Vec<String> {
        LAYERS
            .iter()
            .chain(&["dynamic_scalar.3"])
            .flat_map(|l| [format!("{l}.weight"), format!("{l}.bias")])
            .collect()
    }

    /// The weights the forward pass reads (shared tensors: gradients and
    /// in-place updates reach the head).
    pub fn weights(&self) -> &StateDict {
        &self.w
    }

    /// Normalised combined query for (image, text) features; eval mode
    /// (dropout off).
    pub fn forward(&self, image: &Tensor, text: &Tensor) -> Result<Tensor> {
        self.forward_t(image, text, Dropout::Off)
    }

    /// Widths of the four dropout layers (text, image, combined, dynamic
    /// scalar), in the module's order.
    fn dropout_widths(&self) -> Result<[i64; 4]> {
        let out = |n: &str| -> Result<i64> { Ok(self.w.get(&format!("{n}.weight"))?.size()[0]) };
        Ok([
            out("text_projection_layer")?,
            out("image_projection_layer")?,
            out("combiner_layer")?,
            out("dynamic_scalar.0")?,
        ])
    }

    /// Dropout(0.5) masks (0 or 2) of the four layers, one row per sample,
    /// drawn from SplitMix64 seeded by the sample's key (seed, epoch,
    /// sample): a sample is dropped the same way whatever batch or rank it
    /// falls in, so one rank and many train the same weights.
    pub(crate) fn sample_masks(&self, keys: &[[u64; 3]], device: Device) -> Result<[Tensor; 4]> {
        let widths = self.dropout_widths()?;
        let rows: Vec<[Vec<f32>; 4]> = keys
            .par_iter()
            .map(|k| {
                let mut rng = Rng::new(&[k[0], k[1], k[2], 0xd40]);
                widths.map(|w| {
                    let mut row = Vec::with_capacity(w as usize);
                    while row.len() < w as usize {
                        let bits = rng.next();
                        let take = (w as usize - row.len()).min(64);
                        row.extend((0..take).map(|b| ((bits >> b) & 1) as f32 * 2.0));
                    }
                    row
                })
            })
            .collect();
        let b = keys.len() as i64;
        let layer = |l: usize| {
            let flat: Vec<f32> = rows.iter().flat_map(|r| r[l].iter().copied()).collect();
            Tensor::from_slice(&flat)
                .view([b, widths[l]])
                .to_device(device)
        };
        Ok([layer(0), layer(1), layer(2), layer(3)])
    }

    /// [`Combiner::forward`] with the original's four Dropout(0.5) layers
    /// drawn as `drop` says, in the module's order (text, image, combined,
    /// dynamic scalar).
    pub(crate) fn forward_t(&self, image: &Tensor, text: &Tensor, drop: Dropout) -> Result<Tensor> {
        let drop = |x: Tensor, l: usize| match &drop {
            Dropout::Off => x,
            Dropout::Masks(m) => {
                let k = x.kind();
                x * m[l].to_kind(k)
            }
        };
        let t = drop(self.lin("text_projection_layer", text)?.relu(), 0);
        let i = drop(self.lin("image_projection_layer", image)?.relu(), 1);
        let raw = Tensor::cat(&[&t, &i], -1);
        let c = drop(self.lin("combiner_layer", &raw)?.relu(), 2);
        let s = self
            .lin(
                "dynamic_scalar.3",
                &drop(self.lin("dynamic_scalar.0", &raw)?.relu(), 3),
            )?
            .sigmoid();
        let out = self.lin("output_layer", &c)? + &s * text + (1.0 - &s) * image;
        Ok(l2_normalize(&out))
    }
}

/// `F.normalize(x, dim=-1)`.
pub(crate) fn l2_normalize(x: &Tensor) -> Tensor {
    let n = x
        .norm_scalaropt_dim(2, [-1i64].as_slice(), true)
        .clamp_min(1e-12);
    x / n
}
