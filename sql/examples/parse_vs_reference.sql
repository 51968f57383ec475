-- Relation texts where the parse and the reference parser disagree most
-- (captions the reference covers only), with matched / extra / missing counts.
WITH covered AS (
  SELECT DISTINCT image_id AS row_id FROM reference.entities
  UNION SELECT DISTINCT image_id FROM reference.relations
), ours AS (
  SELECT g.image_id, g.subject, g.relation, g.object, count(*) AS n
  FROM graphs.relations g
  WHERE g.image_id IN (SELECT row_id FROM covered)
  GROUP BY 1, 2, 3, 4
), ref AS (
  SELECT image_id, subject, relation, object, count(*) AS n
  FROM reference.relations
  GROUP BY 1, 2, 3, 4
), joined AS (
  SELECT coalesce(o.relation, r.relation) AS relation,
         least(coalesce(o.n, 0), coalesce(r.n, 0)) AS matched,
         greatest(coalesce(o.n, 0) - coalesce(r.n, 0), 0) AS extra,
         greatest(coalesce(r.n, 0) - coalesce(o.n, 0), 0) AS missing
  FROM ours o
  FULL OUTER JOIN ref r
    ON o.image_id = r.image_id AND o.subject = r.subject AND o.relation = r.relation AND o.object = r.object
)
SELECT relation, matched, extra, missing
FROM (SELECT relation, sum(matched) AS matched, sum(extra) AS extra, sum(missing) AS missing FROM joined GROUP BY relation)
ORDER BY extra + missing DESC, relation
LIMIT 30;
