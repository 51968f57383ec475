-- mine/subject_objects.sql: the rows of every candidate subject, grouped by
-- (subject, object) and sorted. A subject's rows are the concatenation of its
-- groups, so one ordered list gives both the reference rows (uniform over
-- the subject's rows) and the target lists (uniform over the subject's
-- objects, then over the pair's rows). The sampler cuts it into groups where
-- (subject, object_id) changes.
SELECT c.subject, m.object_id, m.row_id
FROM mine_rows m
JOIN mine_candidates c ON c.subject = m.subject
ORDER BY c.subject, m.object_id, m.row_id
