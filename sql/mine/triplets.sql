-- mine/triplets.sql: the sampler's draws (row ids) joined back to the
-- relation rows. condition = target relation + ' ' + target object.
SELECT
  d.sample_id,
  r.image_id AS ref_image_id,
  r.relation_idx AS ref_relation_idx,
  t.image_id AS target_image_id,
  t.relation_idx AS target_relation_idx,
  x.image_id AS distractor_image_id,
  x.relation_idx AS distractor_relation_idx,
  t.subject,
  t.relation,
  t.object,
  t.relation || ' ' || t.object AS condition,
  d.concreteness,
  d.attempts
FROM mine_draws d
JOIN mine_rows r ON r.row_id = d.ref_row
JOIN mine_rows t ON t.row_id = d.target_row
JOIN mine_rows x ON x.row_id = d.distractor_row
ORDER BY d.sample_id
