-- mine/candidates.sql: subjects that may be sampled. A subject qualifies
-- when it appears in at least {{min_images_with_subject}} distinct images
-- with at least {{min_objects_per_subject}} distinct objects; it is drawn
-- with probability proportional to its number of distinct images.
SELECT
  subject,
  count(DISTINCT image_id) AS n_images,
  count(DISTINCT object) AS n_objects,
  count(*) AS n_rows,
  CAST(count(DISTINCT image_id) AS DOUBLE) / sum(count(DISTINCT image_id)) OVER () AS probability
FROM mine_rows
GROUP BY subject
HAVING count(DISTINCT image_id) >= {{min_images_with_subject}}
   AND count(DISTINCT object) >= {{min_objects_per_subject}}
ORDER BY subject
