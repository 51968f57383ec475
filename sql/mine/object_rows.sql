-- mine/object_rows.sql: the rows of every object, for the distractor (a row
-- uniform among all rows whose object is the target's object).
SELECT object_id, array_agg(row_id ORDER BY row_id) AS row_ids
FROM mine_rows
GROUP BY object_id
ORDER BY object_id
