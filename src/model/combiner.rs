//! The GeneCIS Combiner head (models/combiner_model.py): text and image
//! projections, a combiner layer and a dynamic scalar that mixes the
//! residual text and image features.

use tch::Tensor;

use super::{linear, Result, StateDict};

pub struct Combiner {
    w: StateDict,
    pub dim: i64,
}

impl Combiner {
    /// From a `*_combiner_head.pt` state dict (or any of the formats
    /// [`StateDict::load`] reads).
    pub fn new(w: StateDict) -> Result<Combiner> {
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

    /// Normalised combined query for (image, text) features; eval mode
    /// (dropout off).
    pub fn forward(&self, image: &Tensor, text: &Tensor) -> Result<Tensor> {
        let t = self.lin("text_projection_layer", text)?.relu();
        let i = self.lin("image_projection_layer", image)?.relu();
        let raw = Tensor::cat(&[&t, &i], -1);
        let c = self.lin("combiner_layer", &raw)?.relu();
        let s = self
            .lin(
                "dynamic_scalar.3",
                &self.lin("dynamic_scalar.0", &raw)?.relu(),
            )?
            .sigmoid();
        let out = self.lin("output_layer", &c)? + &s * text + (1.0 - &s) * image;
        Ok(l2_normalize(&out))
    }
}

/// `F.normalize(x, dim=-1)`.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let n = x
        .norm_scalaropt_dim(2, [-1i64].as_slice(), true)
        .clamp_min(1e-12);
    x / n
}
