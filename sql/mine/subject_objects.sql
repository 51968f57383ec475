-- mine/subject_objects.sql: for each candidate subject, its objects and the
-- rows of each (subject, object) pair. A subject's rows are the
-- concatenation of its groups, so one query gives both the reference row
-- list (uniform over the subject's rows) and the target lists (uniform over
-- objects, then over the pair's rows).
SELECT
  c.subject,
  m.object_id,
  array_agg(m.row_id ORDER BY m.row_id) AS row_ids
FROM mine_rows m
JOIN mine_candidates c ON c.subject = m.subject
GROUP BY c.subject, m.object_id
ORDER BY c.subject, m.object_id
