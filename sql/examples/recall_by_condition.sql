-- Recall by condition: which conditions each method gets right, most
-- frequent conditions first (the score stage's recall_by_condition table).
SELECT task, method, condition, n, round(recall_at_1, 3) AS r1, round(recall_at_3, 3) AS r3
FROM recall_by_condition
ORDER BY task, n DESC, condition, method
