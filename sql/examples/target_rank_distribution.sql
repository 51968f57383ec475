-- How far from the top the target lands: templates per target rank, per
-- task and method (rank 1 is a hit at R@1; 15 is last of 15 candidates).
SELECT task, method, target_rank, count(*) AS templates
FROM scores
GROUP BY task, method, target_rank
ORDER BY task, method, target_rank
