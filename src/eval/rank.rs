//! Global retrieval on the chosen device (CIRR, MIT-States): per block of
//! queries one matmul against the whole gallery, the reference masked out as
//! the original does (similarity -1e5), then the best relevant image's rank
//! and the top k.

use tch::{Device, Kind, Tensor};

/// One query's outcome.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ranked {
    /// 1 + the gallery images strictly more similar than the most similar
    /// relevant one (gallery size + 1 when nothing is relevant).
    pub rank: u32,
    /// (gallery position, similarity), most similar first.
    pub top: Vec<(u32, f32)>,
}

/// Queries per matmul: 1,024 x 100,000 similarities are 400 MB in f32.
pub(crate) const BLOCK: usize = 1024;

/// Ranks `queries` (row-major, `d` wide, L2-normalised) against `gallery`
/// (N x d, L2-normalised, on `device`). `mask[i]` is the gallery position
/// of query i's reference; `relevant[i]` the positions that count as hits.
pub(crate) fn rank_global(
    queries: &[f32],
    d: usize,
    gallery: &Tensor,
    mask: &[Option<usize>],
    relevant: &[Vec<usize>],
    k: usize,
    device: Device,
) -> Result<Vec<Ranked>, tch::TchError> {
    let n_gallery = gallery.size()[0] as usize;
    let n = mask.len();
    let k = k.min(n_gallery).max(1);
    let gt = gallery.f_tr()?;
    let mut out = Vec::with_capacity(n);
    for b0 in (0..n).step_by(BLOCK) {
        let b1 = (b0 + BLOCK).min(n);
        let bn = (b1 - b0) as i64;
        let q = Tensor::f_from_slice(&queries[b0 * d..b1 * d])?
            .f_view([bn, d as i64])?
            .f_to_device(device)?;
        let mut s = q.f_matmul(&gt)?;
        let (rows, cols): (Vec<i64>, Vec<i64>) = (b0..b1)
            .filter_map(|i| mask[i].map(|r| ((i - b0) as i64, r as i64)))
            .unzip();
        if !rows.is_empty() {
            let idx = |v: &[i64]| Tensor::from_slice(v).to_device(device);
            let masked = Tensor::from(-1e5f32).to_device(device);
            let _ = s.f_index_put_(&[Some(idx(&rows)), Some(idx(&cols))], &masked, false)?;
        }
        // The best relevant similarity of each query, gathered on the device.
        let (rr, rc): (Vec<i64>, Vec<i64>) = (b0..b1)
            .flat_map(|i| {
                relevant[i]
                    .iter()
                    .map(move |&c| ((i - b0) as i64, c as i64))
            })
            .unzip();
        let mut best = vec![f32::NEG_INFINITY; bn as usize];
        if !rr.is_empty() {
            let idx = |v: &[i64]| Tensor::from_slice(v).to_device(device);
            let vals = s.f_index(&[Some(idx(&rr)), Some(idx(&rc))])?;
            let vals =
                Vec::<f32>::try_from(vals.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?)?;
            for (&r, v) in rr.iter().zip(vals) {
                best[r as usize] = best[r as usize].max(v);
            }
        }
        let best_t = Tensor::f_from_slice(&best)?
            .f_to_device(device)?
            .f_unsqueeze(1)?;
        let above = s
            .f_gt_tensor(&best_t)?
            .f_sum_dim_intlist(&[1i64][..], false, Kind::Int64)?;
        let above = Vec::<i64>::try_from(above.f_to_device(Device::Cpu)?)?;
        let (tv, ti) = s.f_topk(k as i64, 1, true, true)?;
        let tv = Vec::<f32>::try_from(
            tv.f_to_device(Device::Cpu)?
                .f_to_kind(Kind::Float)?
                .f_view([-1])?,
        )?;
        let ti = Vec::<i64>::try_from(ti.f_to_device(Device::Cpu)?.f_view([-1])?)?;
        for i in 0..bn as usize {
            let rank = if best[i] == f32::NEG_INFINITY {
                n_gallery as u32 + 1
            } else {
                above[i] as u32 + 1
            };
            let top = (0..k)
                .map(|j| (ti[i * k + j] as u32, tv[i * k + j]))
                .collect();
            out.push(Ranked { rank, top });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::test_device!(
        masks_the_reference_and_ranks_the_best_relevant_image,
        |device| {
            // Gallery: unit vectors along axes 0..4; queries near some of them.
            let d = 4;
            let mut g = vec![0f32; 4 * d];
            for i in 0..4 {
                g[i * d + i] = 1.0;
            }
            let gallery = Tensor::from_slice(&g).view([4, d as i64]).to_device(device);
            let q = [
                0.9f32, 0.4, 0.1, 0.0, // closest: 0 (masked), then 1, then 2
                0.0, 0.1, 0.2, 0.97, // closest: 3, then 2, then 1
            ];
            let out = rank_global(
                &q,
                d,
                &gallery,
                &[Some(0), None],
                &[vec![2], vec![1, 2]],
                3,
                device,
            )
            .unwrap();
            assert_eq!(out[0].rank, 2, "1 beats 2 once 0 is masked");
            assert_eq!(
                out[0].top.iter().map(|t| t.0).collect::<Vec<_>>(),
                vec![1, 2, 3]
            );
            assert_eq!(out[1].rank, 2, "the better of the relevant 1 and 2 counts");
            let none = rank_global(&q[..d], d, &gallery, &[None], &[vec![]], 2, device).unwrap();
            assert_eq!(none[0].rank, 5);
        }
    );
}
