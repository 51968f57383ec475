-- Histogram of triplet concreteness (mean rating of the six heads), 0.1 wide.
SELECT floor(concreteness * 10) / 10 AS bucket, count(*) AS triplets
FROM triplets
WHERE concreteness IS NOT NULL
GROUP BY 1
ORDER BY 1;
