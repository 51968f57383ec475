-- A few triplets of one subject with the reference, target and distractor
-- relations joined back (join `captions` the same way when the run has it).
SELECT t.sample_id, t.subject,
       r.relation || ' ' || r.object AS reference,
       t.condition AS target,
       d.subject || ' ' || d.relation || ' ' || d.object AS distractor
FROM triplets t
JOIN relations r ON r.image_id = t.ref_image_id AND r.relation_idx = t.ref_relation_idx
JOIN relations d ON d.image_id = t.distractor_image_id AND d.relation_idx = t.distractor_relation_idx
WHERE t.subject = (SELECT subject FROM triplets GROUP BY subject ORDER BY count(*) DESC, subject LIMIT 1)
ORDER BY t.sample_id
LIMIT 10;
