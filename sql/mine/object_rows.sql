-- mine/object_rows.sql: the rows of every object, for the distractor (a row
-- uniform among all rows whose object is the target's object), sorted so the
-- sampler can cut the list where object_id changes.
SELECT object_id, row_id
FROM mine_rows
ORDER BY object_id, row_id
