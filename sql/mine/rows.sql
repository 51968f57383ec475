-- mine/rows.sql: every relation row with a stable row_id, its object's
-- ordinal, and the concreteness of its subject and object heads (exact
-- string match, -1 when the word has no rating). Tables: relations,
-- concreteness. The mine stage materialises this as `mine_rows`.
SELECT
  CAST(row_number() OVER (ORDER BY r.image_id, r.relation_idx, r.subject, r.relation, r.object) - 1 AS BIGINT) AS row_id,
  r.image_id,
  r.relation_idx,
  r.subject,
  r.relation,
  r.object,
  CAST(dense_rank() OVER (ORDER BY r.object) - 1 AS BIGINT) AS object_id,
  CAST(coalesce(cs.score, -1.0) AS DOUBLE) AS subject_score,
  CAST(coalesce(co.score, -1.0) AS DOUBLE) AS object_score
FROM relations r
LEFT JOIN concreteness cs ON cs.word = r.subject
LEFT JOIN concreteness co ON co.word = r.object
ORDER BY row_id
